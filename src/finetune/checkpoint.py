"""Atomic file writes, checkpoint save/load, and the best/last policy.

Every run file is written to a temp file in the same folder, fsynced and renamed over the
old one, so a kill or a full disk leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError

_UMASK = os.umask(0)
os.umask(_UMASK)
MAXIMIZE = {"val_acc": True, "val_balanced_acc": True, "val_loss": False}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; run files read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, required: str = "model") -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint can never run code on load."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FinetuneError(
            f"checkpoint {path} is corrupt or not a plain-tensor checkpoint "
            f"({exc.__class__.__name__}); it was not loaded"
        ) from None
    if not isinstance(payload, dict) or required not in payload:
        raise FinetuneError(f"checkpoint {path} is not a finetune checkpoint (no model state)")
    return payload


def is_improvement(monitor: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if MAXIMIZE[monitor] else value < best


class CheckpointSaver:
    """Owns checkpoint policy: best.pt when the monitored metric improves, last.pt always."""

    def __init__(self, run_dir: Path, monitor: str, best_epoch: int | None = None, best_value: float | None = None):
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.best_epoch = best_epoch
        self.best_value = best_value

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    def update(self, epoch: int, metrics: dict[str, float], portable: dict[str, Any]) -> bool:
        """Write best.pt if `metrics` beat the best so far; return whether they did."""
        value = metrics[self.monitor]
        if not is_improvement(self.monitor, value, self.best_value):
            return False
        self.best_epoch, self.best_value = epoch, value
        save_checkpoint(self.best_path, portable)
        return True

    def save_last(self, payload: dict[str, Any]) -> None:
        save_checkpoint(self.last_path, payload)

    def state(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value}
