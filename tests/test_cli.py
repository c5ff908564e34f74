import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import write_config

from finetune.cli import main
from finetune.config.load import from_dict, load_config
from finetune.runs.results import TIMING

EXPECTED_COLUMNS = [
    "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "trainable_params",
    "epoch_seconds", "feature_seconds", "feature_seconds_reused", "feature_cache", "val_weights", "next_stage",
    "is_best", "lr_head", "lr_backbone",
    "val_acc_cat", "val_acc_dog", "val_acc_frog",
]  # fmt: skip


def test_train_end_to_end_in_a_real_process(config_file, tmp_path):
    path = config_file()
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "train", str(path), "--set", "train.epochs=2", "seed=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "results.csv", "summary.json"]
    assert "epoch 2/2 backbone" in proc.stdout

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["seed"] == 1
    assert resolved["checkpoint"]["monitor"] == "val_acc"  # defaults are written out too

    results = pd.read_csv(run / "results.csv")
    assert list(results.columns) == EXPECTED_COLUMNS
    assert results["epoch"].tolist() == [1, 2]
    assert results["stage"].tolist() == ["head", "backbone"]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["precision"] == "fp32"
    assert summary["final_val_acc"] == results["val_acc"].iloc[-1]

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["arch"] == "resnet18" and best["class_names"] == ["cat", "dog", "frog"]
    assert best["image_size"] == 32 and len(best["mean"]) == 3
    model = __import__("torchvision").models.resnet18(num_classes=3)
    model.load_state_dict(best["model"])


def test_best_checkpoint_is_the_epoch_with_the_best_monitored_value(config_file, tmp_path, capsys):
    for monitor in ("val_loss", "val_acc"):
        run_dir = tmp_path / monitor
        args = ["train", str(config_file()), "--run-dir", str(run_dir), "--set", "train.epochs=4"]
        assert main([*args, f"checkpoint.monitor={monitor}", "train.lr_head=0.05"]) == 0
        results = pd.read_csv(run_dir / "results.csv")
        column = results[monitor]
        best_row = column.idxmin() if monitor == "val_loss" else column.idxmax()
        expected_epoch = int(results.loc[best_row, "epoch"])
        assert results["is_best"].tolist() == [e == expected_epoch for e in results["epoch"]]
        best = torch.load(run_dir / "best.pt", weights_only=True)
        assert best["epoch"] == expected_epoch
        assert math.isclose(best["metrics"][monitor], column[best_row], rel_tol=1e-5)
        last = torch.load(run_dir / "last.pt", weights_only=True)
        assert last["epoch"] == 4
        backbone = results[results["stage"] == "backbone"]  # the head trains alone in epoch 1
        row = backbone.loc[backbone[monitor].idxmin() if monitor == "val_loss" else backbone[monitor].idxmax()]
        judged = json.loads((run_dir / "summary.json").read_text())["judged"]
        final = results[monitor].iloc[-1]
        assert judged == {
            "rule": "last_stage",
            "value": pytest.approx(row[monitor], rel=1e-5),
            "epoch": row["epoch"],
            "stage": "backbone",
            "final": pytest.approx(final, rel=1e-5),
        }
        value = f"{judged['value']:.4f}"
        assert f"judged {monitor} {value} at epoch {row['epoch']} (backbone; checkpoint.judge: last_stage)" in (
            capsys.readouterr().out
        )


def test_an_existing_run_is_never_overwritten(config_file, tmp_path, capsys):
    path = config_file(train={"epochs": 1, "unfreeze_epoch": None})
    assert main(["train", str(path)]) == 0
    first = (tmp_path / "runs" / "tiny" / "results.csv").read_bytes()
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "runs" / "tiny-2" / "results.csv").exists()
    assert (tmp_path / "runs" / "tiny" / "results.csv").read_bytes() == first
    assert main(["train", str(path), "--run-dir", str(tmp_path / "runs" / "tiny")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_same_config_and_seed_give_the_same_numbers(config_file, tmp_path):
    path = config_file(train={"epochs": 2})
    for run in ("a", "b"):
        assert main(["train", str(path), "--run-dir", str(tmp_path / run)]) == 0
    a, b = (pd.read_csv(tmp_path / run / "results.csv").drop(columns=list(TIMING)) for run in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)


def test_streamed_dataset_trains_like_the_in_memory_one(tmp_path):
    """Over data.memory_budget_mb the images stream from disk through DataLoader workers."""
    from conftest import mixed_size_folder

    root = mixed_size_folder(tmp_path)
    config = write_config(tmp_path / "c.yaml", root, tmp_path / "runs", train={"epochs": 2})
    for run, budget in (("memory", 4096), ("streamed", 0)):
        sets = [f"data.memory_budget_mb={budget}", "data.num_workers=2"]
        assert main(["train", str(config), "--run-dir", str(tmp_path / run), "--set", *sets]) == 0
    a, b = (pd.read_csv(tmp_path / run / "results.csv").drop(columns=list(TIMING)) for run in ("memory", "streamed"))
    pd.testing.assert_frame_equal(a, b)


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"finetune {version('finetune')}\n"


SHIPPED = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if not p.name.startswith("space_"))


@pytest.mark.parametrize("shipped", SHIPPED, ids=str)  # space_*.yaml are tune's search spaces, not configs
def test_config_prints_every_key_of_a_shipped_config_and_reads_back_equal(shipped, capsys):
    assert main(["config", str(shipped), "--set", "seed=7"]) == 0
    printed = capsys.readouterr().out
    raw = yaml.safe_load(printed)
    assert raw["seed"] == 7 and "memory_budget_mb" in raw["data"] and raw["checkpoint"]["monitor"]
    assert from_dict(raw) == load_config(shipped, ["seed=7"])


def test_train_takes_the_printed_config_unchanged_and_writes_it_back_byte_for_byte(config_file, tmp_path, capsys):
    path = config_file(train={"epochs": 1, "unfreeze_epoch": None})
    assert main(["config", str(path), "--set", "data.batch_size=4"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert main(["train", str(tmp_path / "resolved.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "config.yaml").read_text() == printed
    assert main(["config", str(path), "--set", "data.bach_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "did you mean data.batch_size" in err


def test_a_csv_of_the_image_folder_trains_the_same_run(imagefolder, tmp_path):
    from conftest import folder_as_csv

    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    config = write_config(tmp_path / "c.yaml", imagefolder, tmp_path / "runs", train={"epochs": 2})
    as_csv = ["data.dataset=csv", f"data.csv={csv}", "data.file_col=path", "data.label_col=y", "data.split_col=part"]
    for run, sets in (("folder", []), ("csv", as_csv)):
        assert main(["train", str(config), "--run-dir", str(tmp_path / run), "--set", "train.lr_head=0.01", *sets]) == 0
    a, b = (pd.read_csv(tmp_path / run / "results.csv").drop(columns=list(TIMING)) for run in ("folder", "csv"))
    pd.testing.assert_frame_equal(a, b)
    assert torch.load(tmp_path / "csv" / "best.pt", weights_only=True)["class_names"] == ["cat", "dog", "frog"]


def test_a_csv_label_column_that_does_not_exist_stops_plan_in_one_line(imagefolder, tmp_path, capsys):
    from conftest import folder_as_csv

    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    config = write_config(tmp_path / "c.yaml", imagefolder, tmp_path / "runs")
    sets = ["data.dataset=csv", f"data.csv={csv}", "data.file_col=path", "data.label_col=class"]
    assert main(["plan", str(config), "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.label_col = 'class'" in err and "columns are path, y, part" in err
    fixed = [*sets[:-1], "data.label_col=y", "data.split_col=part", "data.folds=4"]
    assert main(["plan", str(config), "--set", *fixed, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["train_size"] == 18, "3 of 4 folds of the 24 training rows"
