"""Calibration of a multilabel model: every (image, label) pair is one yes/no prediction, its
sigmoid probability pooled with all the others.

The reliability diagram bins the pairs by probability and sets each bin's mean probability
beside the share of its pairs whose label is present; ECE is their share-weighted gap. One
temperature divides every logit, fitted by L-BFGS on the binary cross-entropy, as calibration.py
fits the multiclass one on the NLL, with the same held-out halves and the same rule: fewer than
MIN_MISTAKES wrong (image, label) decisions at the stored thresholds leave it at 1.

Dividing logits by T > 0 moves no logit across 0, but a label's threshold is a probability
chosen on the uncalibrated ones: `predict --calibrated` moves each threshold with the
probabilities (calibrated_thresholds), so the labels it names are the uncalibrated decision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune.inference.calibration import BINS, SPLIT_SEED, T_RANGE, Bins, CalibrationReport, Kept, keep_temperature

PAIRS = "(image, label) decisions"


def label_bins(probabilities: torch.Tensor, truth: torch.Tensor, bins: int = BINS) -> Bins:
    """Per probability bin over all pairs: mean probability, share of present labels, count."""
    p, present = probabilities.double().flatten(), (truth > 0.5).double().flatten()
    which = (p * bins).floor().long().clamp(0, bins - 1)  # [0, 1/bins) is the first bin: most pairs sit near 0
    count = torch.bincount(which, minlength=bins)
    safe = count.clamp(min=1).double()
    mean_p = torch.bincount(which, p, minlength=bins) / safe
    share = torch.bincount(which, present, minlength=bins) / safe
    return Bins(mean_p.tolist(), share.tolist(), count.tolist())


def label_ece(probabilities: torch.Tensor, truth: torch.Tensor, bins: int = BINS) -> float:
    b = label_bins(probabilities, truth, bins)
    total = sum(b.count)
    return sum(n / total * abs(a - c) for c, a, n in zip(b.confidence, b.accuracy, b.count, strict=True) if n)


def fit_label_temperature(logits: torch.Tensor, truth: torch.Tensor) -> float:
    """The T > 0 minimizing the BCE of sigmoid(logits / T), by L-BFGS on log T from T = 1."""
    z, y = logits.detach().double().cpu(), truth.double().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=200, line_search_fn="strong_wolfe")

    def bce() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(bce)
    return min(max(math.exp(log_t.item()), T_RANGE[0]), T_RANGE[1])


def wrong_decisions(logits: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor) -> int:
    return int(((torch.sigmoid(logits.float()) >= thresholds) != (truth > 0.5)).sum())


def calibrate_labels(logits: torch.Tensor, truth: torch.Tensor, thresholds: list[float]) -> CalibrationReport:
    """ECE and BCE over every (image, label) pair before and after one shared temperature."""
    logits, truth = logits.double().cpu(), truth.double().cpu()
    limits = torch.tensor(thresholds, dtype=torch.float32)

    def kept(rows: torch.Tensor) -> Kept:
        z, y = logits[rows], truth[rows]

        def ece(t: float) -> float:
            return label_ece(torch.sigmoid(z / t), y)

        wrong, fit = wrong_decisions(z, y, limits), lambda: fit_label_temperature(z, y)
        return keep_temperature(wrong, y.numel(), PAIRS, fit, ece)

    whole = kept(torch.arange(len(truth)))
    t = whole.temperature
    halves = torch.randperm(len(truth), generator=torch.Generator().manual_seed(SPLIT_SEED)).tensor_split(2)
    half_t = [kept(h).temperature for h in halves]
    held_out = torch.empty_like(logits)
    for own, other_t in zip(halves, reversed(half_t), strict=True):
        held_out[own] = torch.sigmoid(logits[own] / other_t)
    return CalibrationReport(
        images=len(truth),
        temperature=t,
        ece_before=label_ece(torch.sigmoid(logits), truth),
        ece_after_fit=label_ece(torch.sigmoid(logits / t), truth),
        ece_after_heldout=label_ece(held_out, truth),
        nll_before=F.binary_cross_entropy_with_logits(logits, truth).item(),
        nll_after_fit=F.binary_cross_entropy_with_logits(logits / t, truth).item(),
        half_temperatures=half_t,
        fitted=whole.fitted,
        fit=whole.why,
    )


def calibrated_thresholds(thresholds: list[float], temperature: float) -> list[float]:
    """Each threshold moved as sigmoid(logit / T) moves its probabilities: sigmoid(logit(t) / T),
    so a label is named exactly where the uncalibrated probability reaches t."""
    t = torch.tensor(thresholds, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return torch.sigmoid(torch.logit(t) / temperature).tolist()
