"""Issue 19, lr-find: the LR range test of one stage suggests an LR that trains, ramps only the
stage's own groups after training the epochs before it, and leaves runs and RNG as they were."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config

from finetune.cli import main
from finetune.config.load import load_config
from finetune.lr_find import RangeTest


def ramp(losses: list[float]) -> RangeTest:
    lrs = [10 ** (-6 + i / 10) for i in range(len(losses))]
    return RangeTest("head", {"head": 1.0}, {"head": 1e-3}, lrs, losses, 0.0, 0.0, 0, None, "")


def test_the_suggestion_is_a_tenth_of_where_the_loss_bottoms_out_not_where_noise_puts_its_minimum():
    falling = [2.0 - 0.05 * i for i in range(30)]  # 2.0 -> 0.55
    flat = [0.5 + 0.001 * (i % 3) for i in range(30)]  # noise along the bottom
    test = ramp(falling + flat + [1.0, 3.0, 9.0])
    assert 30 <= test.bottom <= 35  # the flat part starts at 30; a decade-wide average reaches it a little later
    assert test.suggestion == pytest.approx(test.lrs[test.bottom] / 10)
    assert ramp([1.0 + 0.01 * i for i in range(40)]).suggestion is None  # it never fell


def losses_by_epoch(run) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv")


def test_the_suggestion_lands_within_a_factor_of_10_of_the_lr_that_trains_best(tmp_path, capsys):
    """The toy problem: a random-init ResNet18 trained whole on 120 images (the ramp's 100 steps
    are 7 epochs of them, so it does not just memorise a few batches). Too low an LR does not
    train in four epochs, too high a one blows up; a grid around the suggestion finds the best."""
    whole = ["train.freeze_backbone=false", "train.unfreeze_epoch=null"]
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = str(write_config(tmp_path / "c.yaml", data, tmp_path / "runs", train={"epochs": 4}))
    assert main(["lr-find", config, "--set", *whole]) == 0
    out = capsys.readouterr().out
    suggested = float(next(line for line in out.splitlines() if line.startswith("suggested")).split()[4].rstrip(","))
    grid = {factor: suggested * factor for factor in (0.01, 0.1, 1, 10, 100)}
    mean_val_loss = {}
    for factor, lr in grid.items():
        run = tmp_path / f"lr{factor}"
        lrs = [f"train.lr_head={lr}", f"train.lr_backbone={lr / 10}"]
        assert main(["train", config, "--run-dir", str(run), "--set", *whole, *lrs]) == 0
        mean_val_loss[factor] = losses_by_epoch(run)["val_loss"].mean()
    best = min(mean_val_loss, key=mean_val_loss.get)
    assert best in (0.1, 1, 10), mean_val_loss
    table = pd.read_csv(tmp_path / "runs" / "lr_find-tiny" / "lr_find.csv")
    assert list(table.columns) == ["step", "lr", "loss", "smoothed_loss"] and 10 < len(table) <= 100
    assert (tmp_path / "runs" / "lr_find-tiny" / "lr_find.png").stat().st_size > 10_000


def test_lr_find_then_train_equals_train_alone_and_changes_no_run(tmp_path, imagefolder, capsys):
    """The head ramps on cached activations (written to disk, which train then reads); weights,
    RNG and an existing run of the same out_dir are as they were."""
    alone = str(write_config(tmp_path / "alone.yaml", imagefolder, tmp_path / "alone"))
    after = str(write_config(tmp_path / "after.yaml", imagefolder, tmp_path / "after"))
    assert main(["train", alone]) == 0
    run_files = {p: p.read_bytes() for p in (tmp_path / "alone" / "tiny").iterdir() if p.is_file()}
    rng = torch.get_rng_state()
    assert main(["lr-find", alone]) == 0
    assert main(["lr-find", after]) == 0
    assert "fc inputs cached" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), rng)
    assert {p: p.read_bytes() for p in run_files} == run_files
    assert main(["train", after]) == 0
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(tmp_path / d / "tiny" / name, weights_only=True) for d in ("alone", "after"))
        assert a["epoch"] == b["epoch"]
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key


def test_a_later_stage_ramps_its_own_group_after_the_epochs_before_it(tmp_path, imagefolder, capsys):
    """Stage layer4 joins at epoch 2: epoch 1 trains the head first; the ramp moves layer4's LR
    alone (the head keeps its scheduled LR), and the printed --set line, after lr-find's own
    --set, gives layer4 the suggestion and leaves layer3 (which follows it by layer_lr_decay) as it was."""
    stages = "train.unfreeze=[{epoch: 1, modules: [layer4]}, {epoch: 2, modules: [layer3]}]"
    config = str(write_config(tmp_path / "c.yaml", imagefolder, tmp_path / "runs"))
    out_dir = tmp_path / "found"
    sets = ["train.unfreeze_epoch=null", stages, "train.layer_lr_decay=0.5"]
    args = ["lr-find", config, "--set", *sets, "--stage", "layer4", "--steps", "30", "--out", str(out_dir), "--json"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = __import__("json").loads(printed[printed.index("{") :])
    assert result["stage"] == "layer4" and result["ramped"] == {"layer4": 1.0} and result["steps"] <= 30
    assert "epoch 1/3 head" in printed  # trained first, as train would
    words = shlex.split(result["set"])
    assert words[:4] == ["--set", *sets] and len(words) == 5 and words[4].startswith("train.unfreeze=")
    cfg = load_config(config, words[1:])
    assert cfg.train.unfreeze[0].lr == pytest.approx(result["suggestion"], rel=0.05)
    assert cfg.train.unfreeze[1].lr == pytest.approx(0.5e-4) and cfg.train.lr_head == 1.0e-3
    table = pd.read_csv(out_dir / "lr_find.csv")
    assert table["lr"].iloc[0] == pytest.approx(1e-7)
