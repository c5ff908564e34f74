"""Class weights for the cross-entropy loss."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from finetune.data import class_index
from finetune.errors import FinetuneError


def class_weights(spec: str | list | dict, counts: np.ndarray, class_names: list[str]) -> torch.Tensor | None:
    """Per-class loss weights, or None for plain cross-entropy.

    `auto` is sklearn's "balanced" inverse frequency over the classes present in training;
    a class with no training samples gets weight 0 (and a warning) rather than the huge
    weight a 1/(count+eps) formula gives it, which would leave the seen classes near 0.
    """
    if spec == "none":
        return None
    if spec == "auto":
        return torch.tensor(_auto_weights(counts, class_names), dtype=torch.float32)
    if isinstance(spec, list):
        if len(spec) != len(class_names):
            raise FinetuneError(
                f"train.class_weights has {len(spec)} values but the dataset has {len(class_names)} classes; "
                "give one weight per class, or use auto"
            )
        return torch.tensor(spec, dtype=torch.float32)
    return torch.tensor(_weights_from_mapping(spec, class_names), dtype=torch.float32)


def _auto_weights(counts: np.ndarray, class_names: list[str]) -> np.ndarray:
    present = np.flatnonzero(counts)
    labels = np.repeat(present, counts[present])
    weights = np.zeros(len(counts))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        warnings.warn(
            f"class_weights auto: no training samples for {', '.join(missing)}; their weight is 0", stacklevel=3
        )
    return weights


def _weights_from_mapping(spec: dict, class_names: list[str]) -> list[float]:
    """{class name or index: weight}; classes not named keep weight 1."""
    weights = [1.0] * len(class_names)
    for key, value in spec.items():
        weights[class_index(key, class_names, "train.class_weights")] = float(value)
    return weights
