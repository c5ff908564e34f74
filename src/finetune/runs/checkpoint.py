"""Checkpoint save/load (atomic, weights-only) and which epoch is best."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.files import atomic_write_bytes

MAXIMIZE = {
    "val_acc": True,
    "val_balanced_acc": True,
    "val_loss": False,
    "val_map": True,
    "val_f1_micro": True,
    "val_f1_macro": True,
}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def checkpoint_file(path: str | Path) -> Path:
    """The file a checkpoint argument names: a run dir stands for its best.pt, the model the
    run is judged by; a dir without one says what it holds instead."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "best.pt").is_file():
        return path / "best.pt"
    held = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".onnx"))
    if "last.pt" in held:
        raise FinetuneError(f"{path} has no best.pt; it holds {', '.join(held)}: give {path / 'last.pt'}")
    what = f"holds only {', '.join(held)}" if held else "holds no checkpoint"
    raise FinetuneError(f"{path} has no best.pt and {what}; give a checkpoint file or a run dir that train wrote")


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


def is_improvement(monitor: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta`: the one rule for best.pt and early stopping."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if MAXIMIZE[monitor] else value < best - min_delta


class BestTracker:
    """The best epoch so far by the monitored metric: which model best.pt holds."""

    def __init__(self, monitor: str, best_epoch: int | None = None, best_value: float | None = None):
        self.monitor = monitor
        self.best_epoch = best_epoch
        self.best_value = best_value

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Whether `metrics` beat the best so far (and become it)."""
        value = metrics[self.monitor]
        if not is_improvement(self.monitor, value, self.best_value):
            return False
        self.best_epoch, self.best_value = epoch, value
        return True

    def state(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_value": self.best_value}
