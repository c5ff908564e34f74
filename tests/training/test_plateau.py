"""Issue 18: stages that start when the stage before settles (a plateau of the monitor)."""

from __future__ import annotations

import json
import signal

import pandas as pd
import pytest
import torch
from processes import Finetune, Torchrun, assert_same_as_reference, csv_rows, resume, stop_when, with_reference

from finetune.cli import main

FLAT = ["train.lr_head=1e-12", "train.lr_backbone=1e-12"]  # val_acc stays where it starts
STAGED = "train.unfreeze_epoch=null"  # the tiny config's shorthand gives way to the stages


def plateau_stages(**layer4) -> str:
    rule = {"patience": 1, "max_epochs": 3, **layer4}
    body = ", ".join(f"{k}: {str(v).lower()}" for k, v in rule.items())
    return f"train.unfreeze=[{{modules: [layer4], after: plateau, {body}}}, {{modules: [backbone], epoch: 5}}]"


def run(config, tmp_path, *sets, name="run") -> pd.DataFrame:
    args = ["train", str(config), "--run-dir", str(tmp_path / name), "--set", "train.epochs=6", STAGED, *sets]
    assert main(args) == 0
    return pd.read_csv(tmp_path / name / "results.csv")


def test_a_plateau_stage_starts_once_the_monitor_stops_improving(config_file, tmp_path, capsys):
    results = run(config_file(), tmp_path, *FLAT, plateau_stages())
    assert results["stage"].tolist() == ["head", "head", "layer4", "layer4", "layer4", "backbone"]
    assert results["next_stage"][1] == "layer4 trains from epoch 3 (val_acc plateaued for 1 epoch(s))"
    assert "next stage: layer4 trains from epoch 3" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stage_starts"] == {"head": 1, "layer4": 3, "backbone": 6}


def test_min_epochs_holds_a_plateau_stage_back_and_max_epochs_forces_it(config_file, tmp_path):
    held = run(config_file(), tmp_path, *FLAT, plateau_stages(min_epochs=3), name="held")
    assert held["stage"].tolist()[:4] == ["head", "head", "head", "layer4"]
    forced = run(config_file(), tmp_path, *FLAT, plateau_stages(patience=50, max_epochs=2), name="forced")
    assert forced["stage"].tolist()[:3] == ["head", "head", "layer4"]
    assert "max_epochs 2 reached" in forced["next_stage"][1]


@pytest.mark.parametrize("ema", ["null", "{decay: 0.5}"], ids=["weights", "ema"])
def test_restore_best_puts_back_the_weights_of_the_stage_befores_best_epoch(make_trainer, ema):
    """With EMA the best epoch was scored on the average, so the average's weights come back."""
    from finetune.training.ema import evaluated_weights

    stages = "train.unfreeze=[{modules: [layer4], after: plateau, patience: 1, max_epochs: 6, restore_best: true}]"
    trainer = make_trainer("train.epochs=8", "train.lr_head=0.05", STAGED, stages, f"train.ema={ema}")
    after: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(1, 8):
        trainer.run_epoch(epoch)
        after[epoch] = {k: v.clone() for k, v in evaluated_weights(trainer.model, trainer.ema).items()}
        if trainer.book.log.rows[-1]["next_stage"]:
            break
    rows = trainer.book.log.rows
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    assert f"weights of epoch {best} restored" in rows[-1]["next_stage"]
    assert best < epoch, "a plateau: the switching epoch did not improve, and the weights trained on after the best"
    restored = trainer.model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in after[best].items())


def test_plan_shows_a_plateau_stage_as_its_window(config_file, capsys):
    args = ["plan", str(config_file()), "--set", "train.epochs=6", STAGED, plateau_stages(min_epochs=2, max_epochs=3)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3-4, on plateau of val_acc" in out


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{modules: [layer4], after: later}]", r"after = 'later' is invalid"),
        ("[{modules: [layer4], after: plateau, patience: 0}]", r"patience = 0 must be >= 1"),
        ("[{modules: [layer4], after: plateau, min_epochs: 3, max_epochs: 2}]", r"max_epochs = 2 must be >= "),
        ("[{modules: [layer4], after: plateau, epoch: 2}]", r"starts on a plateau, so it takes no epoch"),
        (
            "[{modules: [layer4], after: plateau, max_epochs: 3}, {modules: [backbone], epoch: 2}]",
            r"as late as epoch 4",
        ),
        ("[{modules: [layer4], after: plateau}, {modules: [backbone], epoch: 4}]", r"has no max_epochs"),
    ],
)
def test_bad_plateau_stages_are_one_line_from_plan_and_train(config_file, capsys, stages, message):
    for command in ("plan", "train"):
        assert main([command, str(config_file()), "--set", "train.epochs=6", STAGED, f"train.unfreeze={stages}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory):
    """A plateau config that trains for real (restore_best included), and its uninterrupted run."""
    root = tmp_path_factory.mktemp("plateau")
    train = {
        "epochs": 5,
        "lr_head": 0.01,
        "unfreeze": [
            {"modules": ["layer4"], "after": "plateau", "patience": 1, "max_epochs": 2, "restore_best": True},
            {"modules": ["backbone"], "after": "plateau", "patience": 1, "max_epochs": 1, "restore_best": True},
        ],
        "scheduler": {"name": "cosine"},
        "unfreeze_warmup_epochs": 0.5,
    }
    config, reference = with_reference(root, train)
    switches = pd.read_csv(reference / "results.csv")["next_stage"].notna()
    return config, reference, [int(e) for e in switches[switches].index + 1]


def test_kill_inside_and_right_after_a_plateau_switch_resumes_bit_identical(plateau_run, tmp_path):
    config, reference, switches = plateau_run
    assert len(switches) == 2, "the reference run switched stage twice"
    epoch = switches[-1]  # detected in a layer4 epoch: head epochs on cached features are over in a blink
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    stop_when(proc, lambda: proc.bar_at(f"epoch {epoch}", steps=2), signal.SIGKILL)  # inside the detecting epoch
    assert csv_rows(run) == epoch - 1
    proc = Finetune("train", "--resume", run)
    stop_when(proc, lambda: proc.bar_at(f"epoch {epoch + 1}", steps=2), signal.SIGKILL)  # right after the switch
    assert csv_rows(run) == epoch
    resume(run)
    assert_same_as_reference(run, reference)


def test_under_torchrun_every_rank_switches_at_the_same_step(plateau_run, tmp_path):
    config, reference, _ = plateau_run
    proc = Torchrun(tmp_path / "logs", "train", config, "--run-dir", tmp_path / "run")
    out = proc.finish()
    assert proc.returncode == 0, out + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert results["next_stage"].notna().any()
    assert proc.rank_log(0, "stdout").count("weights identical on 2 ranks") == len(results)


def test_a_plateau_on_the_last_epoch_starts_nothing(config_file, tmp_path):
    """No stage after the run: the last.pt keeps the trained weights, stage_starts says none."""
    stages = [STAGED, "train.unfreeze=[{modules: [layer4], after: plateau, patience: 1, restore_best: true}]"]
    assert (
        main(
            ["train", str(config_file()), "--run-dir", str(tmp_path / "run"), "--set", "train.epochs=2", *FLAT, *stages]
        )
        == 0
    )
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert results["next_stage"].isna().all()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stage_starts"]["layer4"] is None


def test_plan_window_starts_where_a_plateau_can_first_be_seen(config_file, tmp_path):
    """A stage's first epoch always improves, so patience 1 needs two epochs of the stage before."""
    from finetune.config.load import load_config
    from finetune.plan import make_plan

    cfg = load_config(str(config_file()), ["train.epochs=6", *FLAT, STAGED, plateau_stages()])
    assert make_plan(cfg).groups[1]["trains from epoch"].startswith("3-")
    assert run(config_file(), tmp_path, *FLAT, plateau_stages())["stage"].tolist()[2] == "layer4"


def test_a_sweep_grids_plateau_settings_like_any_key(config_file, tmp_path):
    """`after`, `patience` and `max_epochs` are swept as whole stage lists (top-level commas split)."""
    fast = "[{modules: [layer4], after: plateau, patience: 1, max_epochs: 1}]"
    slow = "[{modules: [layer4], after: plateau, patience: 3, max_epochs: 2}]"
    out = tmp_path / "sweep"
    args = ["sweep", str(config_file()), "--grid", f"train.unfreeze={fast},{slow}", "--out", str(out)]
    assert main([*args, "--set", "train.epochs=4", *FLAT, STAGED]) == 0
    starts = sorted(json.loads(p.read_text())["stage_starts"]["layer4"] for p in out.glob("*/summary.json"))
    assert starts == [2, 3], "max_epochs 1 and 2 of the head"
