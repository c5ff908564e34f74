"""Tiny generated image folders and configs: every test runs in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

CLASSES = ("cat", "dog", "frog")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests: timm's hub fails at once, not after retries


def write_image(path: Path, label: int, rng: np.random.Generator, size: int = 24, mode: str = "RGB") -> None:
    """A learnable image: the class sets which colour channel is bright, plus noise."""
    pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    pixels[..., label % 3] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def make_imagefolder(root: Path, classes=CLASSES, train_per_class=8, val_per_class=4, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(classes):
            n = count[label] if isinstance(count, (list, tuple)) else count
            for i in range(n):
                write_image(root / split / name / f"{i:04d}.png", label, rng)
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


def tiny_config(data_root: Path, out_dir: Path, **sections) -> dict:
    """A config for a real resnet18 (random init) at 32 px on a generated image folder."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "out_dir": str(out_dir),
        "device": "cpu",
        "precision": "fp32",
        "data": {"dataset": "imagefolder", "root": str(data_root), "image_size": 32, "batch_size": 8},
        "model": {"arch": "resnet18", "weights": "none"},
        "train": {"epochs": 3},  # unfreeze_epoch: 1 by default
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, data_root: Path, out_dir: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(data_root, out_dir, **sections)))
    return path


@pytest.fixture
def config_file(tmp_path: Path, imagefolder: Path):
    """Write a tiny config (with optional section overrides) and return its path."""

    def write(**sections) -> Path:
        return write_config(tmp_path / "config.yaml", imagefolder, tmp_path / "runs", **sections)

    return write


@pytest.fixture
def make_trainer(tmp_path: Path, imagefolder: Path):
    """An in-process Trainer on the tiny image folder; `--set`-style overrides."""
    import torch

    from finetune.config import from_dict
    from finetune.data import load_data
    from finetune.hardware import resolve_runtime
    from finetune.models import build_model
    from finetune.rundir import create_run_dir
    from finetune.runwriter import RunWriter
    from finetune.train import Trainer

    def make(*overrides: str, run_name: str = "run"):
        from finetune.config import apply_override

        raw = tiny_config(imagefolder, tmp_path / "runs")
        for item in overrides:
            apply_override(raw, item)
        cfg = from_dict(raw)
        torch.manual_seed(cfg.seed)
        data = load_data(cfg.data)
        built = build_model(cfg.model, data.num_classes)
        run_dir = tmp_path / "runs" / run_name
        create_run_dir(run_dir, cfg)
        return Trainer(cfg, data, built, resolve_runtime(cfg.device, cfg.precision), run_dir, writer=RunWriter(run_dir))

    return make
