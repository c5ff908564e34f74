"""How sure the model should be: expected calibration error (ECE), reliability bins, and
temperature scaling (Guo et al. 2017) fitted on scored logits, with the temperature kept
beside its checkpoint for `predict --calibrated`.

One temperature divides every logit, so the predicted class never changes, only how
confident it is. It is fitted by L-BFGS on the negative log-likelihood, the standard recipe.
ECE after scaling on the images it was fitted on flatters it, so the held-out figure scales
each half of the images by the temperature fitted on the other half.

A set with no mistakes has no finite best temperature: its NLL keeps falling as T goes to 0,
and L-BFGS stops wherever the gradient gets small (T = 0.33 on one such set), which would make
`predict --calibrated` more confident for no reason. With fewer than MIN_MISTAKES wrong images
the temperature is not fitted and stays 1, and calibration.json and the report say so.

Fitting the NLL of a model that is calibrated already can raise its ECE (0.035 -> 0.046 on
one CIFAR-10 run): a fitted temperature that calibrates its own images worse than none, by
ECE, is not kept either, so `predict --calibrated` never reports worse-calibrated numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.files import atomic_write_text

BINS = 15  # equal-width confidence bins, as Guo et al. report ECE
T_RANGE = (0.01, 100.0)  # a guard on what the fit returns; too few mistakes never reach the fit (MIN_MISTAKES)
MIN_MISTAKES = 5  # wrong images needed to fit a temperature: fewer say too little about over-confidence
SPLIT_SEED = 0  # draws the two halves of the held-out estimate


@dataclass
class Bins:
    """Reliability diagram data: per confidence bin, the mean confidence, accuracy and count."""

    confidence: list[float]
    accuracy: list[float]
    count: list[int]


@dataclass
class CalibrationReport:
    images: int
    temperature: float  # fitted on all the images scored: the one kept for predict --calibrated
    ece_before: float  # on all the images, temperature 1
    ece_after_fit: float  # on all the images, scaled by the temperature fitted on them (optimistic)
    ece_after_heldout: float  # each half scaled by the temperature fitted on the other half
    nll_before: float
    nll_after_fit: float
    half_temperatures: list[float]  # fitted on each half, for the held-out figure (1 where a half has too few mistakes)
    fitted: bool = True  # False: too few mistakes to fit on, so the temperature is 1
    fit: str = ""  # what the temperature was fitted on, or why it was not
    bins: int = BINS

    def to_json(self) -> dict:
        return asdict(self)


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """The share-weighted gap between confidence and accuracy over equal-width confidence bins."""
    b = reliability_bins(probabilities, labels, bins)
    total = sum(b.count)
    return sum(n / total * abs(a - c) for c, a, n in zip(b.confidence, b.accuracy, b.count, strict=True) if n)


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> Bins:
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    which = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1  # (0, 1/bins] is the first bin
    count = torch.bincount(which, minlength=bins)
    safe = count.clamp(min=1).double()
    mean_conf = torch.bincount(which, confidence.double(), minlength=bins) / safe
    accuracy = torch.bincount(which, correct, minlength=bins) / safe
    return Bins(mean_conf.tolist(), accuracy.tolist(), count.tolist())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the NLL of softmax(logits / T), by L-BFGS on log T from T = 1."""
    z = logits.detach().double().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), labels.cpu())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(nll)
    return min(max(math.exp(log_t.item()), T_RANGE[0]), T_RANGE[1])


def mistakes(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(1) != labels).sum())


@dataclass
class Kept:
    temperature: float
    fitted: bool
    why: str  # what it was fitted on, or why it stays 1


def keep_temperature(
    wrong: int, total: int, what: str, fit: Callable[[], float], ece: Callable[[float], float]
) -> Kept:
    """The temperature kept for `total` `what` (images, or (image, label) decisions), `wrong` of
    them wrong: `fit()`'s, unless there are too few mistakes to fit on or it raises their ECE."""
    if wrong < MIN_MISTAKES:
        return Kept(
            1.0, False, f"temperature 1, not fitted: {wrong} wrong {what} to fit on (needs at least {MIN_MISTAKES})"
        )
    t = fit()
    if ece(t) > ece(1.0):
        return Kept(1.0, False, f"temperature 1: the fitted {t:.3f} raised ECE on these {what} (already calibrated)")
    return Kept(t, True, f"fitted on {total} {what}, {wrong} of them wrong")


def kept_temperature(logits: torch.Tensor, labels: torch.Tensor) -> Kept:
    def ece(t: float) -> float:
        return expected_calibration_error((logits / t).softmax(1), labels)

    wrong, fit = mistakes(logits, labels), lambda: fit_temperature(logits, labels)
    return keep_temperature(wrong, len(labels), "images", fit, ece)


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> CalibrationReport:
    """ECE and NLL before and after temperature scaling: on the fit images, and held out."""
    logits, labels = logits.double().cpu(), labels.cpu()
    kept = kept_temperature(logits, labels)
    t = kept.temperature
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    halves = order.tensor_split(2)
    half_t = [kept_temperature(logits[h], labels[h]).temperature for h in halves]
    held_out = torch.empty_like(logits)
    for own, other_t in zip(halves, reversed(half_t), strict=True):
        held_out[own] = (logits[own] / other_t).softmax(1)
    return CalibrationReport(
        images=len(labels),
        temperature=t,
        ece_before=expected_calibration_error(logits.softmax(1), labels),
        ece_after_fit=expected_calibration_error((logits / t).softmax(1), labels),
        ece_after_heldout=expected_calibration_error(held_out, labels),
        nll_before=F.cross_entropy(logits, labels).item(),
        nll_after_fit=F.cross_entropy(logits / t, labels).item(),
        half_temperatures=half_t,
        fitted=kept.fitted,
        fit=kept.why,
    )


# ---- the temperature kept beside its checkpoint ------------------------------------------------
def temperature_file(checkpoint: Path) -> Path:
    """best.pt -> best.temperature.json, in the checkpoint's folder."""
    return checkpoint.with_suffix(".temperature.json")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_temperature(checkpoint: Path, temperature: float, fitted_on: str) -> Path:
    record = {
        "temperature": temperature,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_digest(checkpoint),
        "fitted_on": fitted_on,
    }
    path = temperature_file(checkpoint)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def stored_temperature(checkpoint: Path) -> float:
    """The temperature inspect fitted for this very checkpoint file, or one line saying what to run."""
    if checkpoint.suffix == ".onnx" or checkpoint.name.endswith(".torchscript.pt"):
        raise FinetuneError(
            f"predict --calibrated: {checkpoint.name} is an exported model, which keeps no temperature; "
            "give the checkpoint that finetune inspect scored (best.pt)"
        )
    path = temperature_file(checkpoint)
    if not path.is_file():
        raise FinetuneError(
            f"predict --calibrated: {checkpoint} has no fitted temperature ({path.name}); "
            f"run `finetune inspect {checkpoint}` first"
        )
    record = json.loads(path.read_text())
    if record.get("checkpoint_sha256") != file_digest(checkpoint):
        raise FinetuneError(
            f"predict --calibrated: {path.name} was fitted for an earlier {checkpoint.name}; "
            f"run `finetune inspect {checkpoint}` again"
        )
    return float(record["temperature"])
