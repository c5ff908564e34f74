"""Tiny generated image folders and configs: every test runs in seconds on a CPU."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

CLASSES = ("cat", "dog", "frog")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network in tests: timm's hub fails at once, not after retries
# runtime measurements of the tests' runs (and the processes they start) stay out of the user's cache
os.environ.setdefault("FINETUNE_CACHE_DIR", tempfile.mkdtemp(prefix="finetune-test-cache-"))


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

    from finetune.config_load import from_dict
    from finetune.data import load_data
    from finetune.models import build_model
    from finetune.rundir import create_run_dir
    from finetune.runtime import resolve_runtime
    from finetune.runwriter import RunWriter
    from finetune.training.loop import Trainer

    def make(*overrides: str, run_name: str = "run"):
        from finetune.config_load import apply_override

        raw = tiny_config(imagefolder, tmp_path / "runs")
        for item in overrides:
            apply_override(raw, item)
        cfg = from_dict(raw)
        torch.manual_seed(cfg.seed)
        data = load_data(cfg.data)
        built = build_model(cfg.model, data.num_classes)
        run_dir = tmp_path / "runs" / run_name
        create_run_dir(run_dir, cfg)
        return Trainer(cfg, data, built, resolve_runtime(cfg), run_dir, writer=RunWriter(run_dir))

    return make


# Test tiers (markers in pyproject.toml). `./scripts/test.sh --fast` deselects all three;
# CI runs everything. A whole module is tiered by its name, a test in a mixed module by its
# own, and every test that asks for `make_trainer` trains in-process.
MODULE_TIERS = {
    "test_resume": ("process",),  # kills and resumes `finetune train` processes
    "test_distributed": ("process",),  # torchrun
    "test_cli": ("training",),
    "test_compare": ("training",),  # its runs are trained first
    "test_inference": ("training",),  # ditto
    "test_augment": ("extras",),  # kornia
    "test_ecosystem": ("extras",),  # timm, onnx, tensorboard
}
TEST_TIERS = {
    "test_cli.py::test_train_end_to_end_in_a_real_process": ("process",),
    "test_sweep.py::test_killed_sweep_rerun_skips_finished_runs_and_resumes_the_interrupted_one": ("process",),
    "test_ecosystem.py::test_tensorboard_stream_continues_after_a_resume_without_duplicate_steps": ("process",),
    "test_ecosystem.py::test_a_timm_model_trains_in_stages_resumes_and_predicts": ("training",),
    "test_ecosystem.py::test_export_round_trips_within_tolerance_and_predict_reads_it": ("training",),
    "test_sweep.py::test_grid_over_seeds_writes_each_run_as_train_would_and_aggregates_seeds": ("training",),
    "test_sweep.py::test_a_list_of_configs_is_one_sweep_with_shared_sets": ("training",),
    "test_sweep.py::test_a_user_error_in_a_later_run_stops_the_sweep_and_keeps_finished_runs": ("training",),
    "test_schedule.py::test_three_stage_cosine_run_records_the_lrs_plan_printed": ("training",),
    "test_schedule.py::test_early_stopping_resets_at_a_new_stage_and_is_reported": ("training",),
    "test_schedule.py::test_patience_running_out_on_the_last_epoch_leaves_the_run_extendable": ("training",),
    "test_edge_cases.py::test_training_on_33_images_in_batches_of_32_runs_cached_and_uncached": ("training",),
    "test_hardware.py::test_summary_records_the_memory_format": ("training",),
    "test_bad_input.py::test_nan_loss_stops_with_epoch_and_step_and_keeps_best": ("training",),
    "test_bad_input.py::test_weights_that_turn_non_finite_on_an_epochs_last_step_are_never_saved": ("training",),
    "test_models.py::test_a_timm_model_loads_a_weights_file": ("extras",),
}


def tiers(item: pytest.Function) -> set[str]:
    module = item.path.stem
    found = {*MODULE_TIERS.get(module, ()), *TEST_TIERS.get(f"{item.path.name}::{item.originalname}", ())}
    if "make_trainer" in item.fixturenames:
        found.add("training")
    return found


def pytest_collection_modifyitems(items: list[pytest.Function]) -> None:
    for item in items:
        for tier in tiers(item):
            item.add_marker(tier)
