"""`finetune inspect` on a real trained multilabel run (tiny cat/dog/frog images labelled
`cat pet`, `dog pet` and nothing): the files, the Grad-CAM label named, the page in a real
Chromium, the same bytes twice, and predict --calibrated as sigmoid(logits / T) with the
uncalibrated labels."""

import json
import math

import pandas as pd
import pytest
import torch
from browser import assert_renders
from conftest import folder_as_csv, make_imagefolder, write_config

from finetune.cli import main
from finetune.inference.calibration import save_temperature
from finetune.inference.calibration_multilabel import calibrate_labels, calibrated_thresholds

LABELS = {"cat": "cat pet", "dog": "dog pet", "frog": ""}
FILES = (
    "report.html",
    "top_losses.png",
    "top_correct.png",
    "most_missed.csv",
    "most_missed.png",
    "pr_curves.png",
    "reliability.png",
    "calibration.json",
    "per_class.csv",
    "metrics.json",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_ml")
    data = make_imagefolder(root / "data", train_per_class=8, val_per_class=4)
    csv = folder_as_csv(data, root / "labels.csv", LABELS)
    keys = {"dataset": "csv", "csv": str(csv), "file_col": "path", "label_col": "y", "split_col": "part"}
    config = write_config(
        root / "c.yaml",
        data,
        root / "runs",
        task="multilabel",
        model={"arch": "mobilenet_v2", "weights": "none"},
        data={**keys, "image_size": 24},
        train={"epochs": 2, "lr_head": 0.01},
    )
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return root / "run", data


@pytest.fixture(scope="module")
def inspected(run):
    run_dir, _ = run
    assert main(["inspect", str(run_dir), "--top", "4"]) == 0
    return run_dir / "inspect-best"


def test_inspect_writes_the_multilabel_files(inspected, run, tmp_path):
    for name in FILES:
        assert (inspected / name).is_file(), name
    assert not (inspected / "most_confused.csv").exists()
    missed = pd.read_csv(inspected / "most_missed.csv")
    assert list(missed["label"].sort_values()) == ["cat", "dog", "pet"]
    assert list(missed.columns) == ["label", "support", "fn", "fp", "recall", "precision", "threshold", "ap"]
    assert missed.set_index("label")["support"].to_dict() == {"cat": 4, "dog": 4, "pet": 8}
    assert missed["fn"].is_monotonic_decreasing
    calibration = json.loads((inspected / "calibration.json").read_text())
    assert calibration["images"] == 12 and calibration["nll_after_fit"] <= calibration["nll_before"] + 1e-12
    assert "(image, label)" in calibration["fit"]
    metrics = json.loads((inspected / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and 0 <= metrics["map"] <= 1


def test_the_page_renders_and_names_the_grad_cam_label(inspected, tmp_path):
    page = inspected / "report.html"
    text = page.read_text()
    for part in ("Calibration", "Most wrong", "Most missed labels", "Per label", "mAP per epoch", "Config"):
        assert f"<h2>{part}" in text, part
    assert "the Grad-CAM of the label it got most wrong" in text
    assert_renders(page, tmp_path, least_images=7)


def test_the_grad_cam_caption_names_the_label(run):
    from finetune.inference.inspect_multilabel import ScoredLabels, surest_label, worst_label

    logits = torch.tensor([[3.0, -3.0, -2.0], [-3.0, 3.0, 3.0]])
    truth = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    scored = ScoredLabels(logits, truth, ["cat", "dog", "pet"], [0.5, 0.5, 0.5])
    assert worst_label(scored, 0) == (0, "false cat 0.95")  # -log(1 - 0.95) beats the missed pet's -log(0.12)
    assert surest_label(scored, 1)[1].startswith("surest true dog")
    scored.logits[0, 0] = -3.0
    del scored.probabilities, scored.predicted, scored.label_losses
    assert worst_label(scored, 0) == (2, "missed pet 0.12")


def test_a_second_inspect_writes_the_same_bytes(inspected, run, tmp_path):
    run_dir, _ = run
    assert main(["inspect", str(run_dir / "best.pt"), "--top", "4", "--out", str(tmp_path / "again")]) == 0
    for name in ("report.html", "top_losses.png", "pr_curves.png", "calibration.json", "most_missed.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (inspected / name).read_bytes(), name


def test_predict_calibrated_is_sigmoid_of_logits_over_t_with_the_uncalibrated_labels(inspected, run, capsys):
    run_dir, data = run
    images = [str(data / "val" / name / "0001.png") for name in ("cat", "dog", "frog")]
    save_temperature(run_dir / "best.pt", 2.5, "a test's temperature")
    capsys.readouterr()
    assert main(["predict", str(run_dir), *images, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run_dir), *images, "--json", "--calibrated"]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    for before, after in zip(plain, calibrated, strict=True):
        for name, p in before["probabilities"].items():
            expected = 1 / (1 + math.exp(-math.log(p / (1 - p)) / 2.5))
            assert after["probabilities"][name] == pytest.approx(expected, abs=1e-4)
        assert [t["class"] for t in after["labels"]] == [t["class"] for t in before["labels"]]


def test_too_few_wrong_decisions_leave_the_temperature_at_one():
    logits = torch.tensor([[4.0, -4.0]] * 6 + [[-4.0, 4.0]] * 6)
    truth = (logits > 0).float()
    truth[0, 1] = 1.0  # one wrong (image, label) decision
    report = calibrate_labels(logits, truth, [0.5, 0.5])
    assert (report.fitted, report.temperature) == (False, 1.0) and "1 wrong (image, label)" in report.fit
    assert calibrated_thresholds([0.5, 0.8], 2.0)[0] == pytest.approx(0.5)
