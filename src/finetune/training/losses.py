"""Class weights and the losses: class-weighted (focal) cross-entropy for one label per image,
binary cross-entropy (or its focal form) per label for multi-label images."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.config.schema import TrainConfig
from finetune.data.sources import class_index
from finetune.errors import FinetuneError

# focal loss: (1 - p_t) is floored here, where (1 - p_t)^gamma with gamma < 1 has an infinite slope
FOCAL_FLOOR = 1e-6
POS_WEIGHT_BOUNDS = (1.0, 100.0)  # multilabel `class_weights: auto`: negatives / positives, clipped to this


def build_criterion(
    cfg: TrainConfig,
    spec: str | list | dict,
    counts: np.ndarray,
    images: int,
    class_names: list[str],
    multilabel: bool,
) -> tuple[nn.Module, torch.Tensor | None]:
    """The training loss and its class weights by `spec` (train.class_weights, or what the
    balanced sampler leaves of it); multilabel: each label's positive weight."""
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    if multilabel:
        weights = positive_weights(spec, counts, images, class_names)
        return MultiLabelLoss(weights, cfg.label_smoothing, gamma), weights
    weights = class_weights(spec, counts, class_names)
    return WeightedCrossEntropy(weights, cfg.label_smoothing, gamma), weights


def positive_weights(
    spec: str | list | dict, counts: np.ndarray, images: int, class_names: list[str]
) -> torch.Tensor | None:
    """BCE's `pos_weight` per label: `auto` is negatives / positives in training, clipped to
    POS_WEIGHT_BOUNDS so that a label seen twice does not swamp the gradient; a label with
    no positive image gets 1 (and a warning). A list or mapping gives the weights as is."""
    if spec != "auto":
        return class_weights(spec, counts, class_names)
    low, high = POS_WEIGHT_BOUNDS
    ratio = np.divide(images - counts, counts, out=np.ones(len(counts)), where=counts > 0)
    missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        warnings.warn(
            f"class_weights auto: no training image carries {', '.join(missing)}; their positive weight is 1",
            stacklevel=3,
        )
    return torch.tensor(np.clip(ratio, low, high), dtype=torch.float32)


def correct(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Images predicted right: the class (argmax), or for multi-hot truth every label (logit > 0)."""
    if truth.ndim == 2:
        return ((logits > 0) == (truth > 0.5)).all(1).sum()
    return (logits.argmax(1) == truth).sum()


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
    `gamma` > 0 makes it the focal loss (Lin et al., 2017): each log-probability term is scaled
    by (1 - p_c)^gamma, so confidently right images count less.
    """

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float = 0.0, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing, self.gamma = label_smoothing, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch; `targets` are class indices (N,) or probabilities (N, C)."""
        classes = logits.shape[1]
        if not targets.is_floating_point():
            targets = F.one_hot(targets, classes)
        targets = targets.float()
        weight = self.weight if self.weight is not None else logits.new_ones(classes, dtype=torch.float32)
        smoothed = targets * (1 - self.label_smoothing) + self.label_smoothing / classes
        log_p = F.log_softmax(logits.float(), dim=1)
        if self.gamma:
            log_p = log_p * (1 - log_p.exp()).clamp_min(FOCAL_FLOOR).pow(self.gamma)
        per_sample = -(log_p * smoothed * weight).sum(1)
        return per_sample.sum() / (targets * weight).sum()


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy with logits on every label of multi-hot (or MixUp-mixed) targets,
    averaged over images and labels. `pos_weight` weighs each label's positive term; label
    smoothing moves each target eps/2 toward 0.5; `gamma` > 0 scales each term by
    (1 - p_t)^gamma, the sigmoid focal loss (p_t: the probability given to the target)."""

    def __init__(self, pos_weight: torch.Tensor | None, label_smoothing: float = 0.0, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.label_smoothing, self.gamma = label_smoothing, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        if self.gamma:
            p = logits.sigmoid()
            p_t = p * targets + (1 - p) * (1 - targets)
            loss = loss * (1 - p_t).clamp_min(FOCAL_FLOOR).pow(self.gamma)
        return loss.mean()
