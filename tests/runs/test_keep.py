"""checkpoint.keep: what a run keeps once it ends, and what `--resume` says when last.pt went."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from finetune.cli import main
from finetune.runs.writer import dropped

RESULTS = ["config.yaml", "results.csv", "summary.json"]


def test_a_finished_run_keeps_last_pt_by_default_and_extends(config_file, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(config_file(train={"epochs": 1, "unfreeze_epoch": None})), "--run-dir", str(run)]) == 0
    assert sorted(os.listdir(run)) == ["best.pt", *RESULTS[:1], "last.pt", *RESULTS[1:]]
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2


@pytest.mark.parametrize(("keep", "files"), [("best", ["best.pt", *RESULTS]), ("results", RESULTS)])
def test_a_run_that_keeps_less_still_compares_and_resume_says_why_it_cannot_go_on(
    config_file, tmp_path, capsys, keep, files
):
    run = tmp_path / "run"
    config = str(config_file(train={"epochs": 1, "unfreeze_epoch": None}, checkpoint={"keep": keep}))
    assert main(["train", config, "--run-dir", str(run)]) == 0
    assert sorted(os.listdir(run)) == files
    assert main(["compare", str(run), "--out", str(tmp_path / "comparison")]) == 0
    assert pd.read_csv(tmp_path / "comparison" / "comparison.csv")["run"].tolist() == ["run"]
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--resume {run}: the run ended after epoch 1 and has no last.pt" in err
    assert sorted(os.listdir(run)) == files, "nothing changed"


def test_auto_drops_last_pt_only_where_nothing_could_continue_the_run():
    finished = {"epochs": 3, "epochs_completed": 3, "stopped_early": None, "pruned": None}
    stopped = {**finished, "epochs_completed": 2, "stopped_early": {"epoch": 2, "reason": "patience"}}
    pruned = {**finished, "epochs_completed": 2, "pruned": {"epoch": 2, "reason": "median"}}
    assert dropped("auto", finished, trial=False) == ()
    assert dropped("auto", finished, trial=True) == ("last.pt",)
    assert dropped("auto", stopped, trial=False) == dropped("auto", pruned, trial=False) == ("last.pt",)
    assert dropped("all", pruned, trial=True) == ()


def test_a_run_that_had_not_ended_and_lost_last_pt_is_not_taken_for_one_keep_trimmed(tmp_path):
    """Only a run that ended (its epochs, or stopped for good) had last.pt dropped by keep."""
    import json

    from finetune.training.session import _ended_without_last

    summary = {"epochs_completed": 1, "epochs": 3, "stopped_early": None, "pruned": None}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert _ended_without_last(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "epochs_completed": 3}))
    assert _ended_without_last(tmp_path)["epochs_completed"] == 3
