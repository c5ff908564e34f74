"""`model.weights` values and reading a weights file: what torchvision's models (build.py) and
timm's (timm_models.py) both need, in a module of its own so neither imports the other."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finetune.errors import FinetuneError


def is_none(weights: str | None) -> bool:
    """`model.weights: none` (any case) or left empty: random initialization."""
    return weights is None or weights.lower() == "none"


def load_weights_file(model: nn.Module, path: Path, arch: str, dropped: tuple[str, ...] = ()) -> None:
    """Load a `torch.save(model.state_dict())` file, or a checkpoint's `model` entry, into `model`.

    `dropped` names top-level modules the model no longer has (torchvision's auxiliary heads),
    whose weights are skipped instead of failing the load.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FinetuneError(
            f"model.weights: {path} is not a loadable state_dict ({exc.__class__.__name__}); "
            "give a file saved with torch.save(model.state_dict())"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k.split(".")[0] not in dropped}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = str(exc).splitlines()[0][:100]
        raise FinetuneError(f"model.weights: {path} does not fit arch {arch} ({detail})") from None
