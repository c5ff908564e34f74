"""Multi-label scores: per-label thresholds chosen on validation images, and the metrics at them.

A label is predicted when its sigmoid probability reaches its threshold. Each label's
threshold is the one that maximizes its F1 on the validation images, placed halfway between
the lowest probability it accepts and the next lower one, so that a probability a hair away
(an exported model's rounding) falls on the same side. A label with fewer than MIN_POSITIVES
positive validation images is too rare to tune and keeps DEFAULT_THRESHOLD.

Average precision comes from sklearn.metrics, imported here only: a multiclass run never pays for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.5
COUNTS = ("tp", "fp", "fn", "tn")  # the columns of a label's confusion counts
MIN_POSITIVES = 5  # positive validation images a label needs before its threshold is tuned


def choose_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """One threshold per label (float32, as probabilities are compared in)."""
    return np.array([_best_f1_threshold(probs[:, j], truth[:, j] > 0.5) for j in range(probs.shape[1])], np.float32)


def _best_f1_threshold(p: np.ndarray, positive: np.ndarray) -> float:
    if positive.sum() < MIN_POSITIVES:
        return DEFAULT_THRESHOLD
    order = np.argsort(-p, kind="stable")
    scores, hits = p[order].astype(np.float64), positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last image of each distinct score
    tp = np.cumsum(hits)[last]
    predicted = last + 1
    f1 = 2 * tp / (predicted + positive.sum())  # 2TP / (2TP + FP + FN)
    k = int(np.argmax(f1))
    lower = scores[last[k] + 1] if last[k] + 1 < len(scores) else 0.0
    return float((scores[last[k]] + lower) / 2)


@dataclass
class LabelScores:
    """Per-label scores (arrays over labels) and their summaries; NaN where a label has no
    positive validation image (its AP, recall and F1 are undefined)."""

    thresholds: np.ndarray
    ap: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    counts: np.ndarray  # (labels, 4): TP, FP, FN, TN

    @property
    def mean_ap(self) -> float:
        """Macro average precision over the labels present in validation."""
        return _nanmean(self.ap)

    @property
    def f1_macro(self) -> float:
        return _nanmean(self.f1)

    @property
    def f1_micro(self) -> float:
        tp, fp, fn, _ = self.counts.sum(0)
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else math.nan

    @property
    def balanced_accuracy(self) -> float:
        """Mean over labels present of (true positive rate + true negative rate) / 2."""
        tp, fp, fn, tn = self.counts.T
        tnr = np.divide(tn, tn + fp, out=np.full(len(tn), np.nan), where=tn + fp > 0)
        return _nanmean((self.recall + np.where(np.isnan(tnr), self.recall, tnr)) / 2)

    def per_label(self, class_names: list[str]) -> dict[str, dict[str, float | None]]:
        """What eval's per_class.csv and --json hold, by label (None: undefined, no positive image)."""
        columns = {"ap": self.ap, "precision": self.precision, "recall": self.recall, "f1-score": self.f1}
        rows = {}
        for j, name in enumerate(class_names):
            row = {key: None if np.isnan(values[j]) else float(values[j]) for key, values in columns.items()}
            counts = dict(zip(COUNTS, (int(c) for c in self.counts[j]), strict=True))
            support = counts["tp"] + counts["fn"]
            rows[name] = {**row, "support": support, "threshold": float(self.thresholds[j]), **counts}
        return rows


def score_labels(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> LabelScores:
    """Scores of sigmoid probabilities (N, labels) against multi-hot truth at `thresholds`."""
    from sklearn.metrics import average_precision_score

    positive = truth > 0.5
    predicted = probs >= np.asarray(thresholds, np.float32)
    tp = (predicted & positive).sum(0)
    fp = (predicted & ~positive).sum(0)
    fn = (~predicted & positive).sum(0)
    tn = (~predicted & ~positive).sum(0)
    present = positive.sum(0) > 0
    ap = np.full(probs.shape[1], np.nan)
    for j in np.flatnonzero(present):
        ap[j] = average_precision_score(positive[:, j], probs[:, j])
    precision = np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=tp + fp > 0)
    recall = np.where(present, tp / np.maximum(tp + fn, 1), np.nan)
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return LabelScores(np.asarray(thresholds, np.float32), ap, precision, recall, f1, np.stack([tp, fp, fn, tn], 1))


def exact_match(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> float:
    """The share of images whose every label is predicted right (sklearn's subset accuracy)."""
    if not len(probs):
        return math.nan
    return float(((probs >= np.asarray(thresholds, np.float32)) == (truth > 0.5)).all(1).mean())


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if len(kept) else math.nan
