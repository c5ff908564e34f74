"""Class weights and the class-weighted cross-entropy loss."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.sources import class_index
from finetune.errors import FinetuneError


def class_weights(spec: str | list | dict, counts: np.ndarray, class_names: list[str]) -> torch.Tensor | None:
    """Per-class loss weights, or None for plain cross-entropy.

    `auto` is sklearn's "balanced" rule, n / (classes * count), over the classes present in training;
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
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (len(present) * counts[present])
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


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy for class indices and soft (MixUp/CutMix) targets alike.

    torch's `CrossEntropyLoss` divides the weighted loss by the batch's summed weights for class
    indices but by the batch size for soft targets, so a one-hot target and its class index give
    different losses (weights [1, 10, 10] on a 6/1/1 batch: 2.23 vs 7.23). Here both divide by the
    summed target weights, a soft target weighing sum_c t_c * w_c: class indices give torch's value
    (to rounding), and a one-hot target the same value as its index. Label smoothing applies to the
    numerator only, as torch does for class indices: the smoothed target (1 - eps) * t + eps / C
    weighs each class's log-probability, while the sample still weighs sum_c t_c * w_c.
    """

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; `targets` are class indices (N,) or probabilities (N, C)."""
        classes = logits.shape[1]
        if not targets.is_floating_point():
            targets = F.one_hot(targets, classes)
        targets = targets.float()
        weight = self.weight if self.weight is not None else logits.new_ones(classes, dtype=torch.float32)
        smoothed = targets * (1 - self.label_smoothing) + self.label_smoothing / classes
        per_sample = -(F.log_softmax(logits.float(), dim=1) * smoothed * weight).sum(1)
        return per_sample.sum() / (targets * weight).sum()
