"""Real `finetune` and `torchrun` processes for the fault tests: start, watch, stop, compare."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from conftest import make_imagefolder, write_config

from finetune.runs.results import TIMING


def with_reference(root: Path, train: dict) -> tuple[Path, Path]:
    """A config of these train keys with enough steps per epoch (30 at batch 4) to be stopped
    mid-epoch, and its uninterrupted run."""
    data = make_imagefolder(root / "data", train_per_class=40, val_per_class=10)
    config = write_config(root / "config.yaml", data, root / "runs", data={"batch_size": 4}, train=train)
    return config, reference_run(config, root / "reference")


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
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "results.csv").drop(columns=list(TIMING)),
        pd.read_csv(reference / "results.csv").drop(columns=list(TIMING)),
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


class Torchrun(subprocess.Popen):
    """`torchrun ... -m finetune ARGS`, each rank's stdout and stderr in its own log file."""

    def __init__(self, logs: Path, *args, nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)):
        self.logs = logs
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}"]
        cmd += ["--log-dir", str(logs), "--redirects", "3", "-m", "finetune", *map(str, args)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FINETUNE_COLLECTIVE_TIMEOUT": "30"}
        super().__init__(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def finish(self, timeout: float = 240) -> str:
        out, _ = self.communicate(timeout=timeout)
        return out

    def rank_log(self, rank: int, stream: str) -> str:
        return "".join(p.read_text() for p in self.logs.rglob(f"{rank}/{stream}.log"))
