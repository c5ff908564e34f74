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


def mixed_size_folder(tmp_path):
    root = make_imagefolder(tmp_path / "mixed")
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            write_image(root / split / name / "large.png", label, rng, size=40)
    return root


def folder_as_csv(root: Path, path: Path, labels: dict[str, str] | None = None) -> Path:
    """The image folder's files as CSV rows (paths relative to `root`), in the order the folder
    is read, with a split column; `labels` renames classes."""
    import pandas as pd

    from finetune.data.imageset import scan_folder

    rows = []
    for split in ("train", "val"):
        names, files, index = scan_folder(root / split)
        for file, label in zip(files, index, strict=True):
            name = names[label]
            rows.append({"path": str(file.relative_to(root)), "y": (labels or {}).get(name, name), "part": split})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


def tiny_config(data_root: Path, out_dir: Path, **sections) -> dict:
    """A config for a real resnet18 (random init) at 32 px on a generated image folder: the head
    alone for an epoch, then the backbone too; a train section with stages replaces that."""
    staged = "unfreeze" in sections.get("train", {})
    cfg = {
        "name": "tiny",
        "seed": 0,
        "out_dir": str(out_dir),
        "device": "cpu",
        "precision": "fp32",
        "data": {"dataset": "imagefolder", "root": str(data_root), "image_size": 32, "batch_size": 8},
        "model": {"arch": "resnet18", "weights": "none"},
        "train": {"epochs": 3} if staged else {"epochs": 3, "unfreeze_epoch": 1},
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

    from finetune.config.load import from_dict
    from finetune.data.sources import load_data
    from finetune.model.build import build_model
    from finetune.runs.rundir import create_run_dir
    from finetune.runs.writer import RunWriter
    from finetune.runtime.resolve import resolve_runtime
    from finetune.training.loop import Trainer

    def make(*overrides: str, run_name: str = "run"):
        from finetune.config.load import apply_override

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


# Test tiers (markers in pyproject.toml): `process` starts real processes, `training` trains a
# model in-process, `extras` needs an optional extra. `./scripts/test.sh --fast` leaves all
# three out; CI runs everything. Whole modules are tiered by name, tests of mixed modules by
# their own name (measured with --durations), and every test that asks for `make_trainer`
# trains. A new test no table names lands in the fast tier: it can slow --fast, never hide.
PROCESS, TRAINING, EXTRAS = ("process",), ("training",), ("extras",)
MODULE_TIERS = {
    "test_resume": PROCESS,  # kills and resumes `finetune train` processes
    "test_distributed": PROCESS,  # torchrun
    "test_sampler": PROCESS,  # data.sampler balanced: kill and resume, torchrun
    "test_cli": TRAINING,
    "test_compare": TRAINING,  # its runs are trained first
    "test_cold_cost": TRAINING,  # ditto
    "test_inference": TRAINING,  # ditto
    "test_bad_input": TRAINING,  # its catalogue starts next to a trained run
    "test_augment": EXTRAS,  # kornia
    "test_ecosystem": EXTRAS,  # timm, onnx, tensorboard
    "test_tune": EXTRAS,  # optuna
    "test_inspect": EXTRAS,  # grad-cam and timm; its run is trained first
    "test_inspect_multilabel": EXTRAS,  # grad-cam; its multilabel run is trained first
    "test_tracking": PROCESS + EXTRAS,  # mlflow server, finetune processes
    "test_plateau": TRAINING,
    "test_toolkit_training": TRAINING,
    "test_multilabel": TRAINING,  # mobilenet_v2 runs (test_multilabel_units: the fast parts)
}
TEST_TIERS = {
    "test_multilabel": {
        "test_kill_9_mid_epoch_then_resume_is_bit_identical": PROCESS,
        "test_two_processes_under_torchrun_train_a_multilabel_run": PROCESS,
    },
    "test_cli": {"test_train_end_to_end_in_a_real_process": PROCESS},
    "test_cold_cost": {"test_a_run_killed_after_computing_its_features_is_charged_them_after_resume": PROCESS},
    "test_ecosystem": {
        "test_tensorboard_stream_continues_after_a_resume_without_duplicate_steps": PROCESS,
        "test_a_timm_model_trains_in_stages_resumes_and_predicts": TRAINING,
        "test_export_round_trips_within_tolerance_and_predict_reads_it": TRAINING,
        "test_an_onnx_model_of_a_fixed_batch_predicts_any_number_of_images": TRAINING,
    },
    "test_rundir": {
        "test_two_trains_of_one_config_started_at_once_get_their_own_dirs": PROCESS,
        "test_a_live_run_is_refused_to_others_and_resumable_at_once_after_kill_9": PROCESS,
        "test_under_torchrun_rank_0_claims_and_every_rank_gets_its_refusal": PROCESS,
        "test_two_sweeps_on_one_dir_train_every_run_exactly_once": PROCESS,
    },
    "test_training_units": {  # two ranks started with torch.multiprocessing
        "test_replicas_compare_every_parameter_buffer_and_average_bit_for_bit_and_share_buffers": PROCESS,
        "test_collectives_use_the_training_device_and_the_stop_vote_is_not_per_step": PROCESS,
        "test_a_signal_on_one_rank_stops_every_rank_after_the_same_epoch": PROCESS,
        "test_ranks_agree_on_the_step_to_stop_at": PROCESS,
    },
    "test_sweep": {
        "test_a_sweep_rerun_continues_a_run_only_as_train_resume_would": PROCESS,
        "test_killed_sweep_rerun_skips_finished_runs_and_resumes_the_interrupted_one": PROCESS,
        "test_grid_over_seeds_writes_each_run_as_train_would_and_aggregates_seeds": TRAINING,
        "test_a_list_of_configs_is_one_sweep_with_shared_sets": TRAINING,
        "test_a_user_error_in_a_later_run_stops_the_sweep_and_keeps_finished_runs": TRAINING,
    },
    "test_schedule": {
        "test_three_stage_cosine_run_records_the_lrs_plan_printed": TRAINING,
        "test_early_stopping_resets_at_a_new_stage_and_is_reported": TRAINING,
        "test_patience_running_out_on_the_last_epoch_leaves_the_run_extendable": TRAINING,
    },
    "test_edge_cases": {"test_training_on_33_images_in_batches_of_32_runs_cached_and_uncached": TRAINING},
    "test_hardware": {"test_summary_records_the_memory_format": TRAINING},
    "test_models": {
        "test_family_trains_a_step_and_evaluates_with_plain_logits": TRAINING,  # 17 models, one step each
        "test_a_timm_model_loads_a_weights_file": EXTRAS,
    },
    "test_plateau": {
        "test_kill_inside_and_right_after_a_plateau_switch_resumes_bit_identical": PROCESS,
        "test_under_torchrun_every_rank_switches_at_the_same_step": PROCESS,
    },
    "test_lr_find": {
        "test_the_suggestion_lands_within_a_factor_of_10_of_the_lr_that_trains_best": TRAINING,
        "test_lr_find_then_train_equals_train_alone_and_changes_no_run": TRAINING,
        "test_a_later_stage_ramps_its_own_group_after_the_epochs_before_it": TRAINING,
    },
    "test_toolkit_training": {
        "test_sigterm_inside_an_accumulated_step_with_ema_and_clipping_resumes_bit_identical": PROCESS,
        "test_accumulation_with_ema_under_torchrun_keeps_the_ranks_identical": PROCESS,
    },
    "test_runtime": {  # these time real train steps for seconds, or train
        "test_two_busy_processes_leave_the_choice_between_candidates_1_5x_apart_as_an_idle_machine_makes_it": PROCESS,
        "test_under_load_a_config_reads_its_kept_choice_and_trains_bit_identical_weights": PROCESS,
        "test_auto_measures_a_copy_once_then_reads_the_cache": TRAINING,
        "test_measuring_times_every_candidate_when_the_budget_allows": TRAINING,
        "test_a_measurement_cut_short_by_the_budget_says_so_and_is_measured_again": TRAINING,
        "test_plan_says_train_will_measure_then_shows_what_train_chose": TRAINING,
        "test_a_resumed_run_keeps_its_measured_choice_and_stays_exact": TRAINING,
        "test_a_compiled_run_trains_as_the_eager_one_does": TRAINING,  # a compile: tens of seconds on a CPU
    },
}


def tiers(item: pytest.Function) -> set[str]:
    module = item.path.stem
    found = {*MODULE_TIERS.get(module, ()), *TEST_TIERS.get(module, {}).get(item.originalname, ())}
    if "make_trainer" in item.fixturenames:
        found.add("training")
    return found


def pytest_collection_modifyitems(items: list[pytest.Function]) -> None:
    for item in items:
        for tier in tiers(item):
            item.add_marker(tier)
