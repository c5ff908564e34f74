"""`finetune inspect` on a real trained run: the files, the page in a real Chromium, the same
bytes twice, the temperature predict --calibrated reads, bad input as one line; and the
Grad-CAM layer each architecture family gets."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from browser import assert_renders
from conftest import make_imagefolder, write_config
from PIL import Image

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.inference.gradcam import cam_layer, grad_cams
from finetune.model.build import rebuild

FILES = (
    "report.html",
    "top_losses.png",
    "top_correct.png",
    "most_confused.csv",
    "most_confused.png",
    "reliability.png",
    "calibration.json",
    "per_class.csv",
    "confusion_matrix.png",
    "metrics.json",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    data = make_imagefolder(root / "data")
    config = write_config(root / "config.yaml", data, root / "runs", train={"epochs": 2})
    assert main(["train", str(config), "--run-dir", str(root / "run"), "--set", "train.lr_head=0.01"]) == 0
    return root / "run", data


@pytest.fixture(scope="module")
def inspected(run, tmp_path_factory):
    run_dir, _ = run
    assert main(["inspect", str(run_dir), "--top", "4"]) == 0
    return run_dir / "inspect-best"


def test_inspect_writes_every_file_beside_the_checkpoint(inspected, run, capsys):
    run_dir, _ = run
    for name in FILES:
        assert (inspected / name).is_file(), name
    metrics = json.loads((inspected / "metrics.json").read_text())
    best = pd.read_csv(run_dir / "results.csv").query("is_best").iloc[0]
    assert metrics["images"] == 12 and metrics["accuracy"] == pytest.approx(best["val_acc"])
    calibration = json.loads((inspected / "calibration.json").read_text())
    assert calibration["nll_after_fit"] <= calibration["nll_before"]
    kept = json.loads((run_dir / "best.temperature.json").read_text())
    assert kept["temperature"] == calibration["temperature"]
    confused = pd.read_csv(inspected / "most_confused.csv")
    assert confused["images"].sum() == round(12 * (1 - metrics["accuracy"]))
    with Image.open(inspected / "top_losses.png") as image:
        assert image.width > 800, "four images and their Grad-CAM side by side"


def test_the_report_renders_in_chromium_with_every_image(inspected, tmp_path):
    page = inspected / "report.html"
    text = page.read_text()
    for part in ("Calibration", "Most wrong", "Most confused", "Per class", "Training curves", "Runtime", "Config"):
        assert f"<h2>{part}" in text
    assert_renders(page, tmp_path, least_images=5)


def test_a_second_inspect_writes_the_same_bytes(inspected, run, tmp_path):
    run_dir, _ = run
    assert main(["inspect", str(run_dir / "best.pt"), "--top", "4", "--out", str(tmp_path / "again")]) == 0
    for name in ("report.html", "top_losses.png", "calibration.json", "most_confused.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (inspected / name).read_bytes(), name


def test_predict_calibrated_divides_the_logits_by_the_kept_temperature(inspected, run, capsys):
    run_dir, data = run
    image = str(data / "val" / "dog" / "0001.png")
    temperature = json.loads((run_dir / "best.temperature.json").read_text())["temperature"]
    capsys.readouterr()
    assert main(["predict", str(run_dir), image, "--json", "--top-k", "3"]) == 0
    plain = {t["class"]: t["probability"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    assert main(["predict", str(run_dir), image, "--json", "--top-k", "3", "--calibrated"]) == 0
    calibrated = {t["class"]: t["probability"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    log_p = torch.tensor([np.log(plain[c]) for c in sorted(plain)], dtype=torch.float64)
    expected = (log_p / temperature).softmax(0).tolist()
    assert [calibrated[c] for c in sorted(plain)] == pytest.approx(expected, abs=1e-5)


def test_predict_calibrated_without_a_temperature_says_to_run_inspect(run, tmp_path, capsys):
    run_dir, data = run
    assert main(["predict", str(run_dir / "last.pt"), str(data / "val"), "--calibrated"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run `finetune inspect {run_dir / 'last.pt'}` first" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--layer", "layer9"],
            "inspect --layer 'layer9': the model has no such module; near names: layer1, layer2, layer3, layer4",
        ),
        (["--layer", "fc"], "inspect --layer fc: its output is (1, 3), not a feature map"),
        (["--top", "0"], "inspect --top 0: must be at least 1"),
        (["--set", "train.epochs=3"], "--set train.epochs=3: only data.*, device and precision can be changed"),
    ],
)
def test_bad_input_is_one_line(run, capsys, args, message):
    run_dir, _ = run
    assert main(["inspect", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_run_dir_without_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("epoch\n")
    assert main(["inspect", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no best.pt and holds no checkpoint" in err


@pytest.mark.parametrize(
    "arch, size, layer",
    [
        ("resnet18", 64, "layer4"),
        ("resnet18", 32, "layer3"),  # layer4 is one pixel at 32 px: the last map larger than that
        ("mobilenet_v2", 64, "features"),
        ("efficientnet_b0", 64, "features"),
        ("timm/resnet18", 64, "layer4"),
        ("timm/vit_tiny_patch16_224", 224, "blocks.11.norm1"),
        ("swin_t", 224, "permute"),  # its stages pass (N, H, W, C) maps; `permute` hands (N, C, H, W) to the pool
    ],
)
def test_each_family_gets_its_usual_layer_and_maps_at_the_input_size(arch, size, layer):
    torch.manual_seed(0)
    model = rebuild(arch, 3, torchvision_weights=False).eval()
    chosen = cam_layer(model, size)
    assert chosen.name == layer
    maps = grad_cams(model, chosen, torch.randn(2, 3, size, size), [0, 2])
    assert maps.shape == (2, size, size) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_a_vit_layer_named_by_hand_gets_its_tokens_reshaped():
    model = rebuild("timm/vit_tiny_patch16_224", 3, torchvision_weights=False).eval()
    chosen = cam_layer(model, 224, "blocks.5.norm1")
    assert chosen.reshape(torch.zeros(2, 197, 192)).shape == (2, 192, 14, 14)
    with pytest.raises(FinetuneError, match="near names: blocks.5.norm1, blocks.5.norm2"):
        cam_layer(model, 224, "blocks.5.norm")
