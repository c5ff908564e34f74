import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, make_imagefolder, write_config, write_image
from PIL import Image

from finetune.cli import main
from finetune.data.batching import BatchTransform
from finetune.data.sources import load_data
from finetune.inference.predict import checkpoint_config, load_predictor, val_probabilities
from finetune.inference.tta import tta_views
from finetune.runs.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = make_imagefolder(root / "data")
    config = write_config(root / "config.yaml", data, root / "runs", train={"epochs": 2})
    assert main(["train", str(config), "--run-dir", str(root / "run"), "--set", "train.lr_head=0.01"]) == 0
    return root / "run", data


def test_eval_reproduces_the_training_metrics_and_writes_reports(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir / "best.pt"), "--out", str(out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    results = pd.read_csv(run_dir / "results.csv")
    best = results.loc[results["is_best"]].iloc[0]
    assert metrics["accuracy"] == pytest.approx(best["val_acc"])
    assert metrics["balanced_accuracy"] == pytest.approx(best["val_balanced_acc"])
    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert list(matrix.columns) == ["cat", "dog", "frog"]
    assert matrix.to_numpy().sum() == metrics["images"] == 12
    assert np.trace(matrix.to_numpy()) / 12 == pytest.approx(metrics["accuracy"])
    per_class = pd.read_csv(out / "per_class.csv", index_col="class")
    assert {"precision", "recall", "f1-score", "support"} <= set(per_class.columns)
    with Image.open(out / "confusion_matrix.png") as img:
        assert img.format == "PNG"


def test_eval_default_output_beside_checkpoint_and_data_override(run, tmp_path):
    run_dir, _ = run
    other = make_imagefolder(tmp_path / "other", val_per_class=2, seed=5)
    assert main(["eval", str(run_dir / "last.pt"), "--set", f"data.root={other}"]) == 0
    assert json.loads((run_dir / "eval-last" / "metrics.json").read_text())["images"] == 6


def test_eval_refuses_data_with_other_classes(run, tmp_path, capsys):
    run_dir, _ = run
    other = make_imagefolder(tmp_path / "other", classes=("a", "b", "c"))
    assert main(["eval", str(run_dir / "best.pt"), "--set", f"data.root={other}"]) == 2
    assert "are not the checkpoint's (cat, dog, frog)" in capsys.readouterr().err


def test_predict_top_k_for_any_image_mode_and_size(run, tmp_path, capsys):
    run_dir, data = run
    rng = np.random.default_rng(1)
    write_image(tmp_path / "imgs" / "gray.png", 0, rng, size=50, mode="L")
    write_image(tmp_path / "imgs" / "rgba.png", 1, rng, size=17, mode="RGBA")
    assert main(["predict", str(run_dir / "best.pt"), str(tmp_path / "imgs"), "--top-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"].rsplit("/", 1)[-1] for r in results] == ["gray.png", "rgba.png"]
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert {t["class"] for t in r["top"]} <= {"cat", "dog", "frog"}


def test_predict_agrees_with_eval_on_the_val_images(run, tmp_path, capsys):
    run_dir, data = run
    assert main(["predict", str(run_dir / "best.pt"), str(data / "val"), "--json", "--top-k", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    correct = [r["top"][0]["class"] == r["file"].split("/")[-2] for r in results]
    assert main(["eval", str(run_dir / "best.pt"), "--out", str(tmp_path / "e")]) == 0
    assert np.mean(correct) == pytest.approx(json.loads((tmp_path / "e" / "metrics.json").read_text())["accuracy"])


def test_predict_table_and_missing_input(run, tmp_path, capsys):
    run_dir, data = run
    assert main(["predict", str(run_dir / "best.pt"), str(data / "val" / "cat" / "0000.png")]) == 0
    assert "top1" in capsys.readouterr().out
    assert main(["predict", str(run_dir / "best.pt"), str(tmp_path / "nope.png")]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err


def test_predict_marks_unreadable_files_and_batches_the_rest(run, tmp_path, capsys):
    run_dir, data = run
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files = [str(data / "val" / "dog" / "0001.png"), str(tmp_path / "broken.png"), str(data / "val" / "cat")]
    assert main(["predict", str(run_dir / "best.pt"), *files, "--json", "--top-k", "5"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [("error" in r) for r in results] == [False, True, False, False, False, False]
    assert all(len(r["top"]) == 3 for r in results if "top" in r), "top-k is capped at the number of classes"


def write_photo(path: Path, label: int, rng: np.random.Generator) -> None:
    """A 2000x1500 JPEG with detail finer than the model's pixels, as a camera's photo has."""
    pixels = rng.integers(0, 80, (150, 200, 3), dtype=np.uint8)
    pixels[..., label] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((2000, 1500), Image.NEAREST).save(path, quality=90)


def test_eval_and_predict_give_identical_probabilities_for_large_photos(tmp_path, capsys):
    """Training decodes a large JPEG at a reduced scale and resizes it with PIL; predict once
    resized the full image in torch instead, inputs up to 0.4 apart (issue 15, bug 12)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            for i in range(2):
                write_photo(tmp_path / "photos" / split / name / f"{i}.jpg", label, rng)
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "photos", tmp_path / "runs", train={"epochs": 1, "unfreeze_epoch": 0}
    )
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "run" / "best.pt"
    assert main(["predict", str(checkpoint), str(tmp_path / "photos" / "val"), "--json", "--top-k", "3"]) == 0
    predicted = [{t["class"]: t["probability"] for t in r["top"]} for r in json.loads(capsys.readouterr().out)]
    ckpt = load_checkpoint(checkpoint)
    for streamed in ("data.memory_budget_mb=0", "data.memory_budget_mb=1000"):
        val = val_probabilities(ckpt, [streamed])
        expected = [[round(p, 6) for p in row] for row in val.probabilities.tolist()]  # as predict prints them
        assert [[p[name] for name in val.class_names] for p in predicted] == expected, streamed


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(run):
    run_dir, data = run
    images = load_data(checkpoint_config(load_checkpoint(run_dir / "best.pt"), []).data).val.images
    predictor = load_predictor(run_dir / "best.pt", "cpu", "fp32", tta="flip")
    t = predictor.transform
    mean_logits = (predictor.logits(t(images)) + predictor.logits(t(images.flip(-1)))) / 2
    expected = mean_logits.softmax(1)
    assert torch.allclose(predictor.probabilities([images]), expected, atol=1e-6)
    plain = predictor.logits(t(images)).softmax(1)
    assert not torch.allclose(plain, expected, atol=1e-4), "the mirror changed something"
    assert torch.equal(predictor.outputs([images])[0], plain)


def test_ten_crop_tta_views_are_image_size_corners_centre_and_mirrors(run):
    run_dir, _ = run
    predictor = load_predictor(run_dir / "best.pt", "cpu", "fp32", tta="crops")
    images = torch.arange(2 * 3 * 24 * 24, dtype=torch.float32).reshape(2, 3, 24, 24).remainder(256).to(torch.uint8)
    inputs = predictor.transform(images)
    views = tta_views("crops", images, inputs, predictor.transform)
    assert len(views) == 10 and all(v.shape == (2, 3, 32, 32) for v in views)
    assert all(torch.equal(views[i + 1], views[i].flip(-1)) for i in range(0, 10, 2))
    enlarged = BatchTransform(
        37, predictor.transform.mean.flatten().tolist(), predictor.transform.std.flatten().tolist(), torch.device("cpu")
    )(images)
    assert torch.equal(views[0], enlarged[..., :32, :32]) and torch.equal(views[8], enlarged[..., 2:34, 2:34])
    expected = torch.stack([predictor.logits(v) for v in views]).mean(0).softmax(1)
    assert torch.allclose(predictor.probabilities([images]), expected, atol=1e-6)


def test_eval_with_tta_records_accuracy_with_and_without_it(run, tmp_path, capsys):
    run_dir, data = run
    assert main(["eval", str(run_dir / "best.pt"), "--out", str(tmp_path / "plain"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["tta"] is None and "without_tta" not in plain and plain["confusion_matrix"]
    assert plain["accuracy"] == json.loads((tmp_path / "plain" / "metrics.json").read_text())["accuracy"]
    for mode, flag in (("flip", ["--tta"]), ("crops", ["--tta", "crops"])):
        out = tmp_path / mode
        assert main(["eval", str(run_dir / "best.pt"), "--out", str(out), *flag]) == 0
        assert f"with {mode} TTA (without: accuracy {plain['accuracy']:.4f})" in capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["tta"] == mode and metrics["images"] == 12
        assert metrics["without_tta"] == {k: plain[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        truth = [name for name in CLASSES for _ in range(4)]
        args = ["predict", str(run_dir / "best.pt"), str(data / "val"), "--json", "--top-k", "1", *flag]
        assert main(args) == 0
        predicted = [r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)]
        assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) == pytest.approx(metrics["accuracy"])


def test_a_run_dir_stands_for_its_best_pt_in_eval_predict_and_export(run, tmp_path, capsys):
    run_dir, data = run
    printed = []
    for model in (run_dir / "best.pt", run_dir):
        assert main(["eval", str(model), "--out", str(tmp_path / model.name)]) == 0
        capsys.readouterr()
        assert main(["predict", str(model), str(data / "val"), "--json"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    metrics = [(tmp_path / name / "metrics.json").read_text() for name in ("best.pt", run_dir.name)]
    assert metrics[0] == metrics[1]
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    assert (
        json.loads(out.with_name(out.name + ".json").read_text())["epoch"]
        == load_checkpoint(run_dir / "best.pt")["epoch"]
    )
