"""Fault tests with real processes: kill training at chosen moments, resume, compare.

A resumed run must end with weights bit-identical to an uninterrupted run of the same
config, and the same results.csv apart from timing.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config


def with_reference(root: Path, train: dict) -> tuple[Path, Path]:
    """A config of these train keys with enough steps per epoch (30 at batch 4) to be stopped
    mid-epoch, and its uninterrupted run."""
    data = make_imagefolder(root / "data", train_per_class=40, val_per_class=10)
    config = write_config(root / "config.yaml", data, root / "runs", data={"batch_size": 4}, train=train)
    return config, reference_run(config, root / "reference")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return with_reference(tmp_path_factory.mktemp("resume"), {"epochs": 3, "unfreeze_epoch": 1})


class Finetune(subprocess.Popen):
    """`finetune ARGS` in a real process; its stdout lines are collected as they come. Its
    stderr is a terminal, so it draws the progress bars a user sees (`screen`): the kill
    tests wait for them to know where training is."""

    def __init__(self, *args):
        cmd = [sys.executable, "-m", "finetune.cli", *map(str, args)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.terminal, tty = pty.openpty()
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # bars need a width
        super().__init__(cmd, stdout=subprocess.PIPE, stderr=tty, text=True, env=env)
        os.close(tty)
        self.lines: list[str] = []
        self.screen = ""
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.stdout), daemon=True)
        self.reader.start()
        self.drawer = threading.Thread(target=self._read_terminal, daemon=True)
        self.drawer.start()

    def _read_terminal(self) -> None:
        while True:
            try:
                chunk = os.read(self.terminal, 4096)
            except OSError:  # the process closed its end
                return
            if not chunk:
                return
            self.screen += chunk.decode(errors="replace")

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def bar_at(self, desc: str, steps: int = 1) -> bool:
        """Whether the progress bar `desc` has shown at least `steps` done."""
        done = re.findall(rf"{re.escape(desc)}:\s*\d+%\|[^|]*\|\s*(\d+)/", self.screen)
        return any(int(d) >= steps for d in done)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 240) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True

    def finish(self) -> tuple[str, str]:
        """stdout, and what the terminal showed (stderr: bars, errors)."""
        self.wait()
        self.reader.join()
        self.drawer.join()
        os.close(self.terminal)
        return "".join(self.lines), self.screen


def csv_rows(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "results.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def temp_files(run: Path) -> list[str]:
    return [name for name in os.listdir(run) if name.endswith(".tmp")] if run.exists() else []


def stop_when(proc: subprocess.Popen, condition: Callable[[], bool], sig: int) -> int:
    deadline = time.monotonic() + 240  # generous: CI machines are slow and busy
    while not condition():
        assert proc.poll() is None, f"training ended before the kill point: {proc.finish()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.0005)
    proc.send_signal(sig)
    proc.finish()
    return proc.returncode


def assert_same_as_reference(run: Path, reference: Path) -> None:
    ours = torch.load(run / "last.pt", weights_only=True)
    theirs = torch.load(reference / "last.pt", weights_only=True)
    assert ours["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), f"{key} differs after resume"
    for name in ("last.pt", "best.pt"):
        assert torch.load(run / name, weights_only=True)["epoch"] == torch.load(reference / name)["epoch"]
    timing = ["epoch_seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "results.csv").drop(columns=timing),
        pd.read_csv(reference / "results.csv").drop(columns=timing),
    )
    assert not temp_files(run)


def reference_run(config: Path, run: Path) -> Path:
    """An uninterrupted run of `config` in a real process, to compare a resumed one with."""
    proc = Finetune("train", config, "--run-dir", run)
    proc.finish()
    assert proc.returncode == 0
    return run


def resume(run: Path) -> str:
    proc = Finetune("train", "--resume", run)
    out, err = proc.finish()
    assert proc.returncode == 0, err
    return out


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
