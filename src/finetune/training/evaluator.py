"""Evaluation on the validation split: from cached activations above the cut, or full images."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from finetune.data.batching import BatchTransform
from finetune.data.imageset import ImageSet
from finetune.errors import FinetuneError
from finetune.runtime.resolve import Runtime
from finetune.training.ema import WeightAverage, averaged
from finetune.training.features import CutModel
from finetune.training.multilabel import choose_thresholds, exact_match, score_labels
from finetune.training.replicas import Replicas


@dataclass
class EvalResult:
    """`acc` is multilabel's exact match, `per_class` each class's (label's) recall;
    `extra` holds multilabel's val_map / val_f1_micro / val_f1_macro, `thresholds` its
    per-label thresholds chosen on these images."""

    loss: float
    acc: float
    balanced_acc: float
    per_class: dict[str, float]
    confusion: np.ndarray | None  # rows: true class; None for multilabel
    extra: dict[str, float] = field(default_factory=dict)
    thresholds: list[float] | None = None

    def metrics(self) -> dict[str, float]:
        return {"val_acc": self.acc, "val_loss": self.loss, "val_balanced_acc": self.balanced_acc, **self.extra}


class Evaluator:
    def __init__(
        self,
        model: nn.Module,
        transform: BatchTransform,
        val_set: ImageSet,
        class_names: list[str],
        runtime: Runtime,
        batch_size: int,
        guard: Callable[[Iterable], Iterator],
        replicas: Replicas,
        ema: WeightAverage | None,
    ):
        """`ema`: while a weight average is kept, it is what validation scores."""
        self.model, self.transform, self.val_set, self.class_names = model, transform, val_set, class_names
        self.runtime, self.batch_size, self.guard, self.replicas = runtime, batch_size, guard, replicas
        self.ema = ema

    @torch.inference_mode()
    def __call__(self, cut: CutModel | None, cached: torch.Tensor | None) -> EvalResult:
        """Scores on every rank; rank 0's numbers decide for all, so ranks never disagree."""
        self.model.eval()
        size = self.batch_size * 2
        if cut is not None:
            batches, forward = cached.split(size), cut.top
        else:
            batches, forward = self.val_set.in_order(size), lambda images: self.model(self.transform(images))
        count = math.ceil(len(self.val_set) / size)
        shown = tqdm(batches, "val", count, leave=False, disable=None if self.replicas.main else True)
        with averaged(self.ema), self.runtime.autocast(inference=True):
            chunks = [forward(x).float() for x in self.guard(shown)]
        logits = torch.cat(chunks).cpu()
        labels, names = self.val_set.labels, self.class_names
        scored = score_multilabel(logits, labels, names) if labels.ndim == 2 else score(logits, labels, names)
        return self.replicas.from_main(scored)


def score(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    """Loss (unweighted), accuracy, balanced accuracy and per-class accuracy on one split, from
    the confusion matrix (numpy, not sklearn.metrics: importing that costs every run 0.7 s)."""
    preds, truth, k = logits.argmax(1).numpy(), labels.numpy(), len(class_names)
    confusion = np.bincount(truth * k + preds, minlength=k * k).reshape(k, k)  # rows: true class
    seen = confusion.sum(1)
    recall = np.divide(confusion.diagonal(), seen, out=np.full(k, math.nan), where=seen > 0)
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        acc=float((preds == truth).mean()),
        balanced_acc=float(np.nanmean(recall)),  # sklearn's balanced accuracy: over the classes present
        per_class=dict(zip(class_names, recall.tolist(), strict=True)),
        confusion=confusion,
    )


def score_multilabel(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    """Loss (unweighted BCE), then each label's threshold chosen on these images and the scores
    at them: exact match as acc, mean per-label balanced accuracy, mAP, micro and macro F1."""
    probs, truth = logits.sigmoid().numpy(), labels.numpy()
    thresholds = choose_thresholds(probs, truth)
    scores = score_labels(probs, truth, thresholds)
    return EvalResult(
        loss=float(F.binary_cross_entropy_with_logits(logits, labels)),
        acc=exact_match(probs, truth, thresholds),
        balanced_acc=scores.balanced_accuracy,
        per_class=dict(zip(class_names, scores.recall.tolist(), strict=True)),
        confusion=None,
        extra={"val_map": scores.mean_ap, "val_f1_micro": scores.f1_micro, "val_f1_macro": scores.f1_macro},
        thresholds=thresholds.tolist(),
    )


def require_finite(result: EvalResult, head: nn.Module, epoch: int) -> None:
    """A model whose evaluation loss or head is not finite is never written to disk."""
    if math.isfinite(result.loss) and all(bool(torch.isfinite(p).all()) for p in head.parameters()):
        return
    raise FinetuneError(
        f"the model became non-finite in epoch {epoch} (validation loss {result.loss}); lower "
        "train.lr_head / train.lr_backbone (best.pt and last.pt were left as they were)"
    )
