"""`finetune inspect`: what a checkpoint gets wrong and why, from one pass over its validation
images (or the data `--set data.*` gives): the images it got most wrong and where it looked
(Grad-CAM), the class pairs it confuses, how far its confidence can be trusted (calibration),
and one self-contained report.html with the run's config, curves and runtime beside them.

Everything below is read from that one pass (`Scored`); only the images shown are run again,
through Grad-CAM. The scoring of a task lives in one function (`score_multiclass`), so
another task adds its own scorer and views beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from finetune.data.imageset import ImageSet
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.inference.calibration import Bins, CalibrationReport, calibrate, reliability_bins, save_temperature
from finetune.inference.gradcam import CamLayer, cam_layer, grad_cams, require_gradcam
from finetune.inference.inspect_multilabel import inspect_labels
from finetune.inference.inspect_plots import (
    Shown,
    confused_figure,
    model_view,
    reliability_figure,
    shown_figure,
)
from finetune.inference.inspect_report import scored_on, write_report_page
from finetune.inference.predict import Predictor, checkpoint_config, predictor_from, scores, val_data, write_report
from finetune.runs.checkpoint import checkpoint_file, load_checkpoint

PAIRS = 4  # confused pairs drawn in most_confused.png
EXAMPLES = 3  # images of each side of a pair
MAX_TOP = 100  # --top's bound: each image is a row of a figure, and more than this no one reads


@dataclass
class InspectOptions:
    out: Path | None = None  # default: inspect-<checkpoint name> beside the checkpoint
    top: int = 9  # images in top_losses.png (and in top_correct.png)
    layer: str | None = None  # Grad-CAM's layer; None: the architecture's usual one
    overrides: list[str] = field(default_factory=list)  # --set data.*, device, precision


@dataclass
class Scored:
    """The one pass over the images that everything inspect writes is read from."""

    logits: torch.Tensor  # (N, C) float32, on the CPU
    labels: torch.Tensor
    class_names: list[str]

    # cached: every figure reads them, and on a large validation set each is a pass over (N, C)
    @cached_property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(1)

    @cached_property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @cached_property
    def losses(self) -> torch.Tensor:
        return F.cross_entropy(self.logits, self.labels, reduction="none")


@dataclass
class Inspection:
    out: Path
    images: int
    measure: str  # "accuracy", or a multilabel model's "mAP"
    score: float
    layer: str
    calibration: CalibrationReport
    temperature_file: Path
    seconds: float


def score_multiclass(predictor: Predictor, images: ImageSet, batch_size: int = 64) -> Scored:
    """Logits of every image, in order: a single-label classifier's scoring."""
    chunks = [predictor.logits(predictor.transform(batch)).cpu() for batch in images.in_order(batch_size)]
    logits = torch.cat(chunks) if chunks else torch.zeros(0, len(predictor.class_names))
    return Scored(logits, images.labels.cpu(), predictor.class_names)


def inspect_checkpoint(path: str | Path, options: InspectOptions) -> Inspection:
    """Score once, write every file of the inspection; bad input fails before data loads."""
    started = time.perf_counter()
    if not 1 <= options.top <= MAX_TOP:
        raise FinetuneError(
            f"inspect --top {options.top}: give 1 to {MAX_TOP}; each image is drawn with its Grad-CAM "
            "in top_losses.png and top_correct.png, which past that are too large to read"
        )
    require_gradcam()
    ckpt_path = checkpoint_file(path)
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, options.overrides)
    predictor = predictor_from(ckpt, cfg.device, cfg.precision)
    layer = cam_layer(predictor.model, predictor.transform.size, options.layer)
    val = val_data(cfg, predictor.class_names, "inspect").val
    if len(val) < 2:
        raise FinetuneError(f"inspect: {len(val)} validation image(s); calibration needs at least 2")
    out = options.out or ckpt_path.parent / f"inspect-{ckpt_path.stem}"
    out.mkdir(parents=True, exist_ok=True)
    inspect_task = inspect_labels if cfg.task == "multilabel" else _inspect_classes
    measure, score, calibration = inspect_task(ckpt_path, ckpt, predictor, val, layer, options.top, out)
    fitted_on = f"{len(val)} validation images of data.{cfg.data.dataset} at {cfg.data.root}"
    fitted_on += "" if calibration.fitted else f"; {calibration.fit}"
    kept = save_temperature(ckpt_path, calibration.temperature, fitted_on)
    seconds = time.perf_counter() - started
    return Inspection(out, len(val), measure, score, layer.name, calibration, kept, seconds)


def _inspect_classes(
    ckpt_path: Path, ckpt: dict, predictor: Predictor, val: ImageSet, layer: CamLayer, top: int, out: Path
) -> tuple[str, float, CalibrationReport]:
    """A single-label model's files and page; its accuracy and calibration."""
    scored = score_multiclass(predictor, val)
    report = scores(scored.labels.numpy(), scored.predicted.numpy(), scored.class_names)
    write_report(report, out)  # metrics.json, per_class.csv, confusion_matrix.csv/.png, as eval writes them
    calibration = calibrate(scored.logits, scored.labels)
    _write_views(scored, val, predictor, layer, calibration, top, out)
    write_report_page(out, ckpt_path, ckpt, report, calibration, scored_on(predictor, layer))
    return "accuracy", float(report["accuracy"]), calibration


def _write_views(
    scored: Scored,
    val: ImageSet,
    predictor: Predictor,
    layer: CamLayer,
    calibration: CalibrationReport,
    top: int,
    out: Path,
) -> None:
    """top_losses.png, top_correct.png, most_confused.csv/.png, reliability.png, calibration.json."""
    worst = top_losses(scored, top)
    shown_figure(shown(scored, val, predictor, worst, layer), "Most wrong: highest loss").savefig(
        out / "top_losses.png"
    )
    sure = top_correct(scored, top)
    title = "Right and most sure: where it looked when it was right"
    shown_figure(shown(scored, val, predictor, sure, layer), title).savefig(out / "top_correct.png")
    confused = most_confused(scored)
    atomic_write_text(out / "most_confused.csv", confused.to_csv(index=False, float_format="%.4f"))
    pairs = [_pair_examples(scored, val, predictor, row) for row in confused.head(PAIRS).itertuples()]
    confused_figure(pairs).savefig(out / "most_confused.png")

    def bins_at(t: float) -> Bins:
        return reliability_bins((scored.logits.double() / t).softmax(1), scored.labels, calibration.bins)

    reliability_figure(bins_at, calibration).savefig(out / "reliability.png")
    atomic_write_text(out / "calibration.json", json.dumps(calibration.to_json(), indent=2) + "\n")


def top_losses(scored: Scored, n: int) -> list[int]:
    """The n images with the highest loss, ties in file order."""
    return torch.sort(-scored.losses, stable=True).indices[:n].tolist()


def top_correct(scored: Scored, n: int) -> list[int]:
    """The n right predictions the model was surest of."""
    right = (scored.predicted == scored.labels).nonzero().flatten()
    confidence = scored.probabilities.max(1).values[right]
    return right[torch.sort(-confidence, stable=True).indices[:n]].tolist()


def most_confused(scored: Scored) -> pd.DataFrame:
    """(true, predicted) pairs by how many images went that way, the share of the true class too."""
    names = scored.class_names
    k = len(names)
    matrix = torch.bincount(scored.labels * k + scored.predicted, minlength=k * k).view(k, k).numpy()
    support = matrix.sum(1)
    rows = [
        {
            "true": names[t],
            "predicted": names[p],
            "images": int(matrix[t, p]),
            "share_of_true": matrix[t, p] / support[t],
        }
        for t in range(k)
        for p in range(k)
        if t != p and matrix[t, p] > 0
    ]
    table = pd.DataFrame(rows, columns=["true", "predicted", "images", "share_of_true"])
    return table.sort_values("images", ascending=False, kind="stable").reset_index(drop=True)


def shown(
    scored: Scored, val: ImageSet, predictor: Predictor, indices: list[int], layer: CamLayer | None = None
) -> list[Shown]:
    """The images at `indices` as the model saw them, with their scores and, given a layer,
    their Grad-CAM for the class predicted."""
    if not indices:
        return []
    inputs, pixels = model_view(val, predictor, indices)
    predicted = scored.predicted[indices].tolist()
    cams = grad_cams(predictor.model, layer, inputs, predicted) if layer else [None] * len(indices)
    probabilities, losses = scored.probabilities, scored.losses
    return [
        Shown(
            image=np.ascontiguousarray(pixels[i]),
            cam=cams[i],
            true=scored.class_names[int(scored.labels[index])],
            predicted=scored.class_names[p],
            probability=float(probabilities[index, p]),
            true_probability=float(probabilities[index, scored.labels[index]]),
            loss=max(float(losses[index]), 0.0),  # not -0.00: a sure right answer's rounding
        )
        for i, (index, p) in enumerate(zip(indices, predicted, strict=True))
    ]


def _pair_examples(scored: Scored, val: ImageSet, predictor: Predictor, row) -> tuple[str, list[Shown], list[Shown]]:
    """(title, images of `true` taken for `predicted`, worst first; images of `predicted` it got
    right, surest first)."""
    t, p = scored.class_names.index(row.true), scored.class_names.index(row.predicted)
    confidence, losses = scored.probabilities.max(1).values, scored.losses
    wrong = ((scored.labels == t) & (scored.predicted == p)).nonzero().flatten()
    right = ((scored.labels == p) & (scored.predicted == p)).nonzero().flatten()
    wrong = wrong[torch.sort(-losses[wrong], stable=True).indices[:EXAMPLES]].tolist()
    right = right[torch.sort(-confidence[right], stable=True).indices[:EXAMPLES]].tolist()
    title = f"{row.true} taken for {row.predicted}: {row.images} images ({row.share_of_true:.0%} of {row.true})"
    return title, shown(scored, val, predictor, wrong), shown(scored, val, predictor, right)
