"""`task: multilabel` runs of mobilenet_v2 and every command on them: eval, predict, export,
compare, sweep, tune, kill -9 and resume. Tiny generated images: cat, dog and frog pictures
labelled `cat pet`, `dog pet` and nothing (test_multilabel_units.py: the parts that train nothing)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import folder_as_csv, make_imagefolder, write_config
from processes import Finetune, Torchrun, assert_same_as_reference, reference_run, resume, stop_when

from finetune.cli import main
from finetune.config.schema import DataConfig

LABELS = {"cat": "cat pet", "dog": "dog pet", "frog": ""}  # frog images carry no label: valid negatives
NAMES = ["cat", "dog", "pet"]


def labelled(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> tuple[Path, Path]:
    data = make_imagefolder(root / "data", train_per_class=train_per_class, val_per_class=val_per_class)
    return data, folder_as_csv(data, root / "labels.csv", LABELS)


def ml_config(root: Path, csv: Path, images: Path, name: str = "c.yaml", **sections) -> Path:
    """A multilabel mobilenet_v2 (random init) config on the CSV: the head for an epoch, then all."""
    base = {
        "task": "multilabel",
        "model": {"arch": "mobilenet_v2", "weights": "none"},
        # 24 px, the images' own size: eval (a set upscaled on the device) and predict (files resized
        # by PIL) then see the same pixels, so their label decisions can be compared one for one
        "data": {
            "dataset": "csv",
            "csv": str(csv),
            "file_col": "path",
            "label_col": "y",
            "split_col": "part",
            "image_size": 24,
        },
        "train": {"epochs": 2, "unfreeze_epoch": 1, "lr_head": 0.01, "lr_backbone": 0.003},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return write_config(root / name, images, root / "runs", **base)


def csv_data(csv: Path, root: Path, **keys) -> DataConfig:
    return DataConfig(dataset="csv", csv=str(csv), root=str(root), file_col="path", label_col="y", **keys)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- a trained run and the commands on it --------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("multilabel")
    data, csv = labelled(root, train_per_class=12, val_per_class=6)
    config = ml_config(root, csv, data, train={"class_weights": "auto", "label_smoothing": 0.05})
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return root, root / "run", data


def test_a_run_records_map_f1_thresholds_and_positive_weights(trained):
    _, run, _ = trained
    rows = pd.read_csv(run / "results.csv")
    for column in ("val_map", "val_f1_micro", "val_f1_macro", "val_acc", "val_acc_pet"):
        assert rows[column].between(0, 1).all(), column
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["task"], summary["monitor"]) == ("multilabel", "val_map")
    assert summary["class_weights"] == [2.0, 2.0, 1.0]  # 36 images: 12 cats (24 not), 12 dogs, 24 pets
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["task"] == "multilabel" and len(best["thresholds"]) == 3
    assert best["metrics"]["val_map"] == pytest.approx(rows.loc[rows["is_best"], "val_map"].item(), abs=1e-6)


def test_eval_predict_and_the_onnx_export_agree(trained, capsys):
    root, run, data = trained
    assert main(["eval", str(run), "--out", str(root / "eval")]) == 0
    per_class = pd.read_csv(root / "eval" / "per_class.csv", index_col="label")
    assert list(per_class.columns) == ["ap", "precision", "recall", "f1-score", "support", "threshold"]
    confusion = pd.read_csv(root / "eval" / "label_confusion.csv", index_col="label")
    assert (confusion.sum(axis=1) == 18).all() and confusion.loc["pet", ["tp", "fn"]].sum() == 12
    capsys.readouterr()

    val = sorted(str(p) for p in (data / "val").rglob("*.png"))
    assert main(["predict", str(run), *val, "--json"]) == 0
    from_pt = json.loads(capsys.readouterr().out)
    predicted = {name: sum(name in [x["class"] for x in r["labels"]] for r in from_pt) for name in NAMES}
    assert predicted == {name: int(confusion.loc[name, ["tp", "fp"]].sum()) for name in NAMES}

    assert main(["export", str(run), "--format", "onnx"]) == 0
    contract = json.loads((run / "best.onnx.json").read_text())
    assert contract["class_names"] == NAMES and len(contract["thresholds"]) == 3
    assert [o["name"] for o in contract["outputs"]] == ["logits", "probabilities"]
    capsys.readouterr()
    assert main(["predict", str(run / "best.onnx"), *val, "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert [r["labels"] for r in from_onnx] == [r["labels"] for r in from_pt]
    for a, b in zip(from_onnx, from_pt, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(run / "best.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"images": np.zeros((1, 3, 24, 24), np.float32)})
    assert np.allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert probs.shape == (1, 3)


def test_threshold_override_tta_and_torchscript(trained, capsys):
    _, run, data = trained
    images = [str(data / "val" / "cat")]
    assert main(["predict", str(run), *images, "--json", "--threshold", "0.01"]) == 0
    assert all(len(r["labels"]) == 3 for r in json.loads(capsys.readouterr().out)), "every label clears 0.01"
    assert main(["predict", str(run), *images, "--threshold", "1.5"]) == 2
    assert "between 0 and 1" in one_error_line(capsys)
    assert main(["eval", str(run), "--tta", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tta"] == "flip" and set(report["without_tta"]) == {"map", "f1_micro", "f1_macro", "exact_match"}
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run / "best.torchscript.pt"), *images, "--json"]) == 0
    scripted = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), *images, "--json"]) == 0
    assert [r["labels"] for r in scripted] == [r["labels"] for r in json.loads(capsys.readouterr().out)]


def test_compare_puts_a_multilabel_and_a_multiclass_run_side_by_side(trained, tmp_path, capsys):
    root, run, data = trained
    train = {"epochs": 1, "unfreeze_epoch": None}
    single = write_config(tmp_path / "single.yaml", data, tmp_path / "runs", train=train)
    assert main(["train", str(single), "--run-dir", str(tmp_path / "single")]) == 0
    assert main(["predict", str(tmp_path / "single"), str(data / "val"), "--threshold", "0.5"]) == 2
    assert "multiclass model" in one_error_line(capsys)
    assert main(["compare", str(run), str(tmp_path / "single"), "--out", str(tmp_path / "cmp")]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert sorted(table["monitor"]) == ["val_acc", "val_map"]
    assert table["final_val_map"].notna().tolist() == (table["monitor"] == "val_map").tolist()


def test_a_sweep_and_a_tune_on_val_map(trained, tmp_path, capsys):
    root, _, _ = trained
    config = str(root / "c.yaml")
    assert main(["sweep", config, "--grid", "train.lr_head=0.01,0.003", "--out", str(tmp_path / "sweep")]) == 0
    assert "val_map" in (tmp_path / "sweep" / "comparison" / "comparison.csv").read_text()
    pytest.importorskip("optuna")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr_head: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    args = ["tune", config, "--space", str(space), "--trials", "2", "--out", str(tmp_path / "study")]
    assert main(args) == 0
    assert "judged by: val_map" in capsys.readouterr().out


def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path):
    data, csv = labelled(tmp_path, train_per_class=40, val_per_class=6)  # 30 steps per epoch at batch 4
    config = ml_config(tmp_path, csv, data, data={"batch_size": 4}, train={"loss": "focal"})
    reference = reference_run(config, tmp_path / "reference")
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGKILL) == -signal.SIGKILL
    resume(run)
    assert_same_as_reference(run, reference)
    ours, theirs = (torch.load(r / "best.pt", weights_only=True)["thresholds"] for r in (run, reference))
    assert ours == theirs


def test_two_processes_under_torchrun_train_a_multilabel_run(tmp_path):
    data, csv = labelled(tmp_path, train_per_class=8, val_per_class=6)
    config = ml_config(tmp_path, csv, data, data={"batch_size": 4})
    proc = Torchrun(tmp_path / "logs", "train", config, "--run-dir", tmp_path / "run")
    out = proc.finish()
    assert proc.returncode == 0, out + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    assert proc.rank_log(0, "stdout").count("weights identical on 2 ranks") == 2
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["task"] == "multilabel" and len(best["thresholds"]) == 3
