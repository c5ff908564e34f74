"""Fault tests with real processes: kill training at chosen moments, resume, compare.

A resumed run must end with weights bit-identical to an uninterrupted run of the same
config, and the same results.csv apart from timing.
"""

from __future__ import annotations

import signal
import time

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config
from processes import (
    Finetune,
    assert_same_as_reference,
    csv_rows,
    reference_run,
    resume,
    stop_when,
    temp_files,
    with_reference,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return with_reference(tmp_path_factory.mktemp("resume"), {"epochs": 3, "unfreeze_epoch": 1})


def test_sigkill_at_four_points_then_resume_is_bit_identical(setup, tmp_path):
    config, reference = setup
    run = tmp_path / "run"

    # 1. before the first checkpoint: resumes from the start with the saved config
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: (run / "config.yaml").exists(), signal.SIGKILL) == -signal.SIGKILL
    assert not (run / "last.pt").exists()

    # 2. right after epoch 1 (frozen) ends, i.e. at the unfreeze
    proc = Finetune("train", "--resume", run)
    stop_when(proc, lambda: csv_rows(run) == 1, signal.SIGKILL)
    assert csv_rows(run) == 1

    # 3. in the middle of epoch 2, the first unfrozen epoch, once its bar shows steps done
    proc = Finetune("train", "--resume", run)
    stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGKILL)
    assert csv_rows(run) == 1, "the kill should land inside epoch 2"

    # 4. while a checkpoint is being written: the old one must stay valid
    proc = Finetune("train", "--resume", run)
    stop_when(proc, lambda: any(".pt." in name for name in temp_files(run)), signal.SIGKILL)
    assert temp_files(run), "the kill should land during a checkpoint write"
    torch.load(run / "last.pt", weights_only=True)

    resume(run)
    assert_same_as_reference(run, reference)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_mid_epoch_and_resume_exactly(setup, tmp_path, sig, code):
    config, reference = setup
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), sig) == code
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] > 0, "stopped mid-epoch 2"
    out = resume(run)
    assert f"after epoch 1, step {state['progress']['step']}" in out
    assert_same_as_reference(run, reference)


def test_a_second_ctrl_c_while_stopping_still_saves_the_steps_done(setup, tmp_path):
    """The impatient user: a second Ctrl-C once the first was taken (the line says so) lets the
    save of the epoch's steps finish; the run resumes to the reference."""
    config, reference = setup
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert proc.wait_for(lambda: proc.bar_at("epoch 2", steps=2)), "epoch 2 never showed"
    proc.send_signal(signal.SIGINT)
    assert stop_when(proc, lambda: "stopping" in proc.screen, signal.SIGINT) == 130, proc.screen
    assert "still stopping, saving every step done so far" in proc.screen
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] >= 2, "the steps of epoch 2 are kept"
    resume(run)
    assert_same_as_reference(run, reference)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Three stages with a cosine schedule, warmup at the start and after every unfreeze."""
    root = tmp_path_factory.mktemp("staged")
    train = {
        "epochs": 4,
        "unfreeze": [
            {"epoch": 1, "modules": ["layer4"]},
            {"epoch": 2, "modules": ["layer3"]},
            {"epoch": 3, "modules": ["backbone"]},
        ],
        "layer_lr_decay": 0.5,
        "scheduler": {"name": "cosine", "warmup_epochs": 0.5},
        "unfreeze_warmup_epochs": 1.0,
    }
    return with_reference(root, train)


def test_kills_inside_unfreeze_warmups_of_a_three_stage_cosine_run_resume_bit_identical(staged, tmp_path):
    config, reference = staged
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGTERM) == 143
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] > 0, "stopped inside layer4's warmup"
    proc = Finetune("train", "--resume", run)
    stop_when(proc, lambda: proc.bar_at("epoch 3", steps=2), signal.SIGKILL)
    assert csv_rows(run) == 2, "the kill should land inside epoch 3, layer3's warmup"
    resume(run)
    assert_same_as_reference(run, reference)
    lrs = pd.read_csv(run / "results.csv")[["lr_head", "lr_layer4", "lr_layer3", "lr_backbone"]]
    assert (lrs.diff().iloc[1:] != 0).any().all(), "every group's LR moves along the schedule"


@pytest.mark.parametrize("budget", [4096, 0], ids=["in-memory", "streamed"])
def test_mid_epoch_resume_of_a_model_with_dropout_is_bit_identical(tmp_path, budget):
    """MobileNetV2's dropout draws from the torch RNG; streamed DataLoaders must not."""
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    sections = {
        "data": {"batch_size": 4, "memory_budget_mb": budget, "num_workers": 2},
        "model": {"arch": "mobilenet_v2", "weights": "none"},
        "train": {"epochs": 2, "freeze_backbone": False},
    }
    config = write_config(tmp_path / "config.yaml", data, tmp_path / "runs", **sections)
    reference = reference_run(config, tmp_path / "reference")
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=2), signal.SIGTERM) == 143
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] > 0, "stopped mid-epoch 2"
    resume(run)
    assert_same_as_reference(run, reference)


def test_ctrl_c_during_a_long_feature_extraction_stops_within_seconds(tmp_path):
    data = make_imagefolder(tmp_path / "data", train_per_class=100, val_per_class=4)
    sections = {"data": {"image_size": 224}, "train": {"epochs": 1, "unfreeze_epoch": None}}
    config = write_config(tmp_path / "config.yaml", data, tmp_path / "runs", **sections)
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert proc.wait_for(lambda: proc.bar_at("fc inputs")), "the extraction of 300 images at 224 px never showed"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.finish()
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 5, "stopped within a batch or two, not at the end of the extraction"
    assert "resume with: finetune train --resume" in err
    assert not (run / "last.pt").exists(), "nothing of the unfinished first epoch was written"
    resume(run)
    assert csv_rows(run) == 1


def test_ctrl_c_during_a_long_evaluation_keeps_the_epochs_steps(tmp_path):
    """One training step (9 images, batch 8: the last image joins the batch), then 450
    validation images at 128 px: the signal lands in the evaluation (or in the step, which then
    finishes), which stops within a batch; resume evaluates again and ends as the reference."""
    data = make_imagefolder(tmp_path / "data", train_per_class=3, val_per_class=150)
    sections = {
        "data": {"image_size": 128, "batch_size": 8},
        "train": {"epochs": 1, "freeze_backbone": False, "feature_cache": "off"},
    }
    config = write_config(tmp_path / "config.yaml", data, tmp_path / "runs", **sections)
    reference = reference_run(config, tmp_path / "reference")
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert proc.wait_for(lambda: proc.bar_at("val")), "the evaluation never showed"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.finish()
    assert proc.returncode == 130
    assert time.monotonic() - sent < 5, "stopped within a batch or two, not at the end"
    progress = torch.load(run / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["step"]) == (0, 1), "the epoch's step is kept"
    resume(run)
    assert_same_as_reference(run, reference)
