"""The optional extras with the real libraries: timm backbones, ONNX / TorchScript export,
TensorBoard logging."""

from __future__ import annotations

import json
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config
from processes import Finetune, resume, stop_when

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.inference.export import export


def event_accumulator():
    """TensorBoard's event reader; skips the test on an install without the tensorboard extra."""
    return pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def test_a_timm_model_trains_in_stages_resumes_and_predicts(config_file, tmp_path, capsys):
    pytest.importorskip("timm")
    config = str(config_file(model={"arch": "timm/convnext_atto", "weights": "none"}, train={"epochs": 1}))
    run = tmp_path / "timm"
    stages = "train.unfreeze=[{epoch: 0, modules: [stages.3]}]"
    assert main(["train", config, "--run-dir", str(run), "--set", "train.unfreeze_epoch=null", stages]) == 0
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    results = pd.read_csv(run / "results.csv")
    assert results["stage"].tolist() == ["stages.3", "stages.3"]
    assert {"lr_head", "lr_stages.3"} <= set(results.columns)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["arch"] == "timm/convnext_atto" and best["head_name"] == "head.fc"
    capsys.readouterr()
    assert main(["predict", str(run / "best.pt"), str(tmp_path / "data" / "val" / "cat"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_timm_errors_are_one_line(config_file, capsys):
    pytest.importorskip("timm")
    config = str(config_file())
    assert main(["train", config, "--set", "model.arch=timm/convnext_ato"]) == 2
    assert "unknown timm model 'convnext_ato' (did you mean timm/convnext_atto?)" in capsys.readouterr().err
    assert main(["train", config, "--set", "model.arch=timm/convnext_atto", "model.weights=DEFAULT"]) == 2
    assert "could not get timm's pretrained convnext_atto" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_imagefolder(root / "data")
    config = write_config(root / "c.yaml", data, root / "runs", train={"epochs": 2})
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return root / "run" / "best.pt"


@pytest.mark.parametrize(
    ("fmt", "batch", "suffix"), [("onnx", "dynamic", ".onnx"), ("torchscript", "4", ".torchscript.pt")]
)
def test_export_round_trips_within_tolerance_and_predict_reads_it(trained, capsys, fmt, batch, suffix):
    for extra in ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ():
        pytest.importorskip(extra)
    assert main(["export", str(trained), "--format", fmt, "--batch", batch]) == 0
    printed = capsys.readouterr().out
    exported = trained.with_name("best" + suffix)
    assert f"wrote {exported}" in printed
    diff = float(printed.rsplit("within ", 1)[1].split(" ")[0])
    assert diff <= 1e-3
    contract = json.loads(exported.with_name(exported.name + ".json").read_text())
    assert contract["class_names"] == ["cat", "dog", "frog"]
    assert contract["preprocessing"]["image_size"] == 32 and len(contract["preprocessing"]["mean"]) == 3
    assert contract["input"]["shape"][0] == ("batch" if batch == "dynamic" else 4)
    folder = str(trained.parent.parent / "data" / "val" / "dog")
    probabilities = []
    for model in (trained, exported):
        assert main(["predict", str(model), folder, "--json", "--top-k", "3"]) == 0
        found = json.loads(capsys.readouterr().out)
        probabilities.append([[t["probability"] for t in r["top"]] for r in found])
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=5e-3)  # best.pt runs in bf16 here


def test_an_onnx_model_of_a_fixed_batch_predicts_any_number_of_images(trained, tmp_path, capsys):
    """Images go in batches of the exported size, the last one padded and the padding's rows dropped."""
    for extra in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(extra)
    exported = tmp_path / "four.onnx"
    assert main(["export", str(trained), "--batch", "4", "--out", str(exported)]) == 0
    val = trained.parent.parent / "data" / "val"
    dogs = sorted((val / "dog").iterdir())
    for images in ([dogs[0]], dogs, [*dogs, *sorted((val / "cat").iterdir())[:2]]):
        probabilities = []
        for model in (trained, exported):
            capsys.readouterr()
            assert main(["predict", str(model), *map(str, images), "--json", "--top-k", "3"]) == 0
            found = json.loads(capsys.readouterr().out)
            assert [r["file"] for r in found] == list(map(str, images))
            probabilities.append([{t["class"]: t["probability"] for t in r["top"]} for r in found])
        for torch_row, onnx_row in zip(*probabilities, strict=True):
            assert set(torch_row) == set(onnx_row)
            for name, p in torch_row.items():
                assert onnx_row[name] == pytest.approx(p, abs=5e-3)  # best.pt runs in bf16 here


def test_export_refuses_a_bad_batch(trained, capsys):
    assert main(["export", str(trained), "--batch", "zero"]) == 2
    assert "export --batch 'zero': use dynamic or a positive integer" in capsys.readouterr().err


def test_a_failed_export_leaves_the_earlier_export_as_it_was(trained, tmp_path):
    """The parity check runs on a staged model: one that fails replaces nothing and leaves
    no temp file, so a model never sits beside another model's contract (issue 15, bug 10)."""
    out = tmp_path / "model.torchscript.pt"
    export(trained, "torchscript", out, "dynamic", [])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"model.torchscript.pt", "model.torchscript.pt.json"}
    with pytest.raises(FinetuneError, match=r"model\.torchscript\.pt would give logits .*; nothing was written"):
        export(trained, "torchscript", out, "4", [], tolerance=-1.0)  # no difference is small enough
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_tensorboard_stream_continues_after_a_resume_without_duplicate_steps(tmp_path):
    EventAccumulator = event_accumulator()
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train={"epochs": 2})
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run, "--tensorboard")
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGTERM) == 143
    resume(run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/acc", "val/balanced_acc", "lr/head", "lr/backbone", "train/step_loss"} <= set(
        tags["scalars"]
    )
    assert "val/confusion_matrix_at_best" in tags["images"]
    for tag in ("train/step_loss", "lr/backbone", "val/acc"):
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: duplicate or unordered steps {steps}"
    assert [e.step for e in events.Scalars("val/acc")] == [30, 60]  # 30 steps per epoch
    logged = [e.step for e in events.Scalars("train/step_loss")]  # every 10 steps, and where the signal stopped it
    assert set(range(10, 61, 10)) <= set(logged) and len(logged) <= 7, logged
    backbone = {e.step: e.value for e in events.Scalars("lr/backbone")}
    assert backbone[10] == 0 and backbone[40] == pytest.approx(1e-4)


def test_a_resumed_event_stream_replaces_the_steps_it_trains_again(tmp_path, config_file):
    """Killed after 5 logged steps with 3 in last.pt: steps 4 and 5 are trained (and logged)
    again, and only the second session's values remain."""
    EventAccumulator = event_accumulator()
    from finetune.config.load import load_config
    from finetune.runs.writer import RunWriter

    cfg = load_config(config_file(), ["log.tensorboard=true"])
    for session, (done, steps) in enumerate([(0, range(1, 6)), (3, range(4, 7))]):
        writer = RunWriter(tmp_path / "run")
        writer.start(cfg, done)
        for step in steps:
            writer.step(step, loss=float(session), lrs={"head": 0.1})
        writer.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Scalars("train/step_loss")
    assert [(e.step, e.value) for e in events] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
