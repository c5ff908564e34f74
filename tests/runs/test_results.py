"""What a run is judged by (checkpoint.judge): the stage it is responsible for, not a head-only epoch."""

from __future__ import annotations

import math

import pytest

from finetune.runs.results import Judged, judge, judged_by, judged_order


def rows(stages: list[str], values: list[float], monitor: str = "val_acc") -> list[dict]:
    return [{"epoch": i + 1, "stage": s, monitor: v} for i, (s, v) in enumerate(zip(stages, values, strict=True))]


# a plateau run: the head settles at 0.6067 in epoch 2, then the backbone joins and never reaches it
PLATEAU = rows(["head", "head", "head", "layer4", "layer4"], [0.5, 0.6067, 0.6, 0.31, 0.29])


def test_last_stage_judges_only_the_epochs_in_which_every_stage_trains():
    assert judge(PLATEAU, "val_acc", True, "last_stage") == Judged("last_stage", 0.31, 4, "layer4", 0.29)


def test_best_and_final_judge_the_best_and_the_last_epoch():
    assert judge(PLATEAU, "val_acc", True, "best") == Judged("best", 0.6067, 2, "head", 0.29)
    assert judge(PLATEAU, "val_acc", True, "final") == Judged("final", 0.29, 5, "layer4", 0.29)


def test_a_minimized_monitor_judges_its_lowest_value_and_the_first_of_equal_ones():
    losses = rows(["head", "backbone", "backbone", "backbone"], [0.2, 0.9, 0.7, 0.7], "val_loss")
    assert judge(losses, "val_loss", False, "last_stage") == Judged("last_stage", 0.7, 3, "backbone", 0.7)


def test_a_run_that_never_left_the_head_is_judged_over_all_its_epochs():
    assert judge(rows(["head"] * 3, [0.4, 0.5, 0.45]), "val_acc", True, "last_stage").epoch == 2


def test_no_epoch_or_no_number_judges_nothing():
    assert judge([], "val_acc", True, "last_stage") is None
    assert judge(rows(["head"], [math.nan]), "val_acc", True, "best") is None


@pytest.mark.parametrize(("maximize", "better"), [(True, 0.5), (False, 0.3)])
def test_equal_judged_values_are_ordered_by_the_final_value(maximize, better):
    runs = [Judged("last_stage", 0.6, 3, "backbone", final) for final in (0.3, 0.5)]
    best = min(runs, key=lambda j: judged_order(j.value, j.final, maximize))
    assert best.final == better
    judged_better = Judged("last_stage", 0.7 if maximize else 0.5, 3, "backbone", 0.1)
    assert min([*runs, judged_better], key=lambda j: judged_order(j.value, j.final, maximize)) is judged_better


def test_the_rule_in_words_names_the_monitor_and_the_key():
    text = "val_acc over the epochs where every stage trains (checkpoint.judge: last_stage)"
    assert judged_by("val_acc", "last_stage") == text
    described = "judged val_acc 0.3100 at epoch 4 (layer4; checkpoint.judge: last_stage)"
    assert judge(PLATEAU, "val_acc", True, "last_stage").describe("val_acc") == described
