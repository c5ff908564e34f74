"""`finetune inspect` of a multilabel model: what inspect.py writes for a single-label one, read
the multilabel way from one pass over the images (`ScoredLabels`).

top_losses.png holds the images of highest binary cross-entropy, each with a Grad-CAM for the
label it scored most wrongly (a missed label or a false one, whichever costs more loss), and
top_correct.png the images with every label right, their map for the surest true label.
most_missed.csv/.png rank the labels by missed images; pr_curves.png draws each label's
precision-recall curve; calibration pools every (image, label) pair (calibration_multilabel.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from finetune.data.imageset import ImageSet
from finetune.files import atomic_write_text
from finetune.inference.calibration import CalibrationReport
from finetune.inference.calibration_multilabel import calibrate_labels, label_bins
from finetune.inference.gradcam import CamLayer, grad_cams
from finetune.inference.inspect_multilabel_plots import missed_figure, pr_curves_figure
from finetune.inference.inspect_multilabel_report import write_label_page
from finetune.inference.inspect_plots import ShownLabels, model_view, reliability_figure, shown_figure
from finetune.inference.inspect_report import scored_on
from finetune.inference.labels import label_report, write_label_report
from finetune.inference.predict import Predictor
from finetune.training.multilabel import score_labels


@dataclass
class ScoredLabels:
    """The one pass over the images that everything a multilabel inspection writes is read from."""

    logits: torch.Tensor  # (N, L) float32, on the CPU
    truth: torch.Tensor  # (N, L) multi-hot
    class_names: list[str]
    thresholds: list[float]

    @cached_property
    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @cached_property
    def present(self) -> torch.Tensor:
        return self.truth > 0.5

    @cached_property
    def predicted(self) -> torch.Tensor:
        return self.probabilities >= torch.tensor(self.thresholds, dtype=torch.float32)

    @cached_property
    def label_losses(self) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits, self.truth.float(), reduction="none")

    @cached_property
    def losses(self) -> torch.Tensor:
        return self.label_losses.mean(1)

    @cached_property
    def exact(self) -> torch.Tensor:
        return (self.predicted == self.present).all(1)


def score_multilabel(predictor: Predictor, images: ImageSet, batch_size: int = 64) -> ScoredLabels:
    chunks = [predictor.logits(predictor.transform(batch)).cpu() for batch in images.in_order(batch_size)]
    logits = torch.cat(chunks) if chunks else torch.zeros(0, len(predictor.class_names))
    return ScoredLabels(logits, images.labels.cpu().float(), predictor.class_names, list(predictor.thresholds))


def inspect_labels(
    ckpt_path: Path, ckpt: dict[str, Any], predictor: Predictor, val: ImageSet, layer: CamLayer, top: int, out: Path
) -> tuple[str, float, CalibrationReport]:
    """A multilabel model's files and page; its mAP and calibration."""
    scored = score_multilabel(predictor, val)
    report = label_report(scored.probabilities, scored.truth, scored.class_names, scored.thresholds)
    write_label_report(report, out)  # metrics.json, per_class.csv, label_confusion.csv, as eval writes them
    calibration = calibrate_labels(scored.logits, scored.truth, scored.thresholds)
    _write_views(scored, val, predictor, layer, calibration, top, out)
    write_label_page(out, ckpt_path, ckpt, report, calibration, scored_on(predictor, layer))
    return "mAP", float(report["map"]), calibration


def _write_views(
    scored: ScoredLabels,
    val: ImageSet,
    predictor: Predictor,
    layer: CamLayer,
    calibration: CalibrationReport,
    top: int,
    out: Path,
) -> None:
    """top_losses.png, top_correct.png, most_missed.csv/.png, pr_curves.png, reliability.png, calibration.json."""
    worst = top_label_losses(scored, top)
    targets = [worst_label(scored, i) for i in worst]
    note = "Grad-CAM for the label its caption names after CAM"
    items = shown_labels(scored, val, predictor, worst, targets, layer)
    shown_figure(items, "Most wrong: highest loss", note).savefig(out / "top_losses.png")
    sure = top_exact(scored, top)
    items = shown_labels(scored, val, predictor, sure, [surest_label(scored, i) for i in sure], layer)
    shown_figure(items, "Every label right, lowest loss", note).savefig(out / "top_correct.png")
    missed = most_missed(scored)
    atomic_write_text(out / "most_missed.csv", missed.to_csv(index=False, float_format="%.4f"))
    missed_figure(missed).savefig(out / "most_missed.png")
    pr_curves_figure(scored.probabilities.numpy(), scored.present.numpy(), scored.class_names, missed).savefig(
        out / "pr_curves.png"
    )

    def bins_at(t: float):
        return label_bins(torch.sigmoid(scored.logits.double() / t), scored.truth, calibration.bins)

    reliability_figure(bins_at, calibration, ("probability", "share of labels present")).savefig(
        out / "reliability.png"
    )
    atomic_write_text(out / "calibration.json", json.dumps(calibration.to_json(), indent=2) + "\n")


def top_label_losses(scored: ScoredLabels, n: int) -> list[int]:
    """The n images with the highest loss, ties in file order."""
    return torch.sort(-scored.losses, stable=True).indices[:n].tolist()


def top_exact(scored: ScoredLabels, n: int) -> list[int]:
    """The n images with every label right, lowest loss first."""
    right = scored.exact.nonzero().flatten()
    return right[torch.sort(scored.losses[right], stable=True).indices[:n]].tolist()


def worst_label(scored: ScoredLabels, i: int) -> tuple[int, str]:
    """The label image i scored most wrongly: of its wrong decisions (a missed label, a false
    one) the one of highest loss; with none wrong, its label of highest loss."""
    wrong = scored.predicted[i] != scored.present[i]
    loss = scored.label_losses[i].masked_fill(~wrong, -1.0) if wrong.any() else scored.label_losses[i]
    j = int(loss.argmax())
    p = float(scored.probabilities[i, j])
    why = "missed" if scored.present[i, j] and not scored.predicted[i, j] else "false" if wrong[j] else "worst"
    return j, f"{why} {scored.class_names[j]} {p:.2f}"


def surest_label(scored: ScoredLabels, i: int) -> tuple[int, str]:
    """Image i's most probable true label; an image with none: its most probable label."""
    p = scored.probabilities[i]
    present = scored.present[i]
    j = int(p.masked_fill(~present, -1.0).argmax() if present.any() else p.argmax())
    what = "surest true" if present.any() else "no label; most probable"
    return j, f"{what} {scored.class_names[j]} {float(p[j]):.2f}"


def shown_labels(
    scored: ScoredLabels,
    val: ImageSet,
    predictor: Predictor,
    indices: list[int],
    targets: list[tuple[int, str]],
    layer: CamLayer,
) -> list[ShownLabels]:
    """The images at `indices` with their labels and the Grad-CAM of each one's target label."""
    if not indices:
        return []
    inputs, pixels = model_view(val, predictor, indices)
    cams = grad_cams(predictor.model, layer, inputs, [j for j, _ in targets])
    names, p = scored.class_names, scored.probabilities
    return [
        ShownLabels(
            image=np.ascontiguousarray(pixels[k]),
            cam=cams[k],
            true=[names[j] for j in scored.present[i].nonzero().flatten().tolist()],
            predicted=sorted(
                ((names[j], float(p[i, j])) for j in scored.predicted[i].nonzero().flatten().tolist()),
                key=lambda pair: -pair[1],
            ),
            cam_for=why,
            loss=float(scored.losses[i]),
        )
        for k, (i, (_, why)) in enumerate(zip(indices, targets, strict=True))
    ]


def most_missed(scored: ScoredLabels) -> pd.DataFrame:
    """Per label at its threshold: support, missed (FN) and false (FP) images, recall, precision,
    AP; the most missed first (then the most false)."""
    s = score_labels(scored.probabilities.numpy(), scored.truth.numpy(), np.array(scored.thresholds, np.float32))
    table = pd.DataFrame(
        {
            "label": scored.class_names,
            "support": (s.counts[:, 0] + s.counts[:, 2]).astype(int),  # TP + FN
            "fn": s.counts[:, 2].astype(int),
            "fp": s.counts[:, 1].astype(int),
            "recall": s.recall,
            "precision": s.precision,
            "threshold": s.thresholds.astype(float),
            "ap": s.ap,
        }
    )
    return table.sort_values(["fn", "fp"], ascending=False, kind="stable").reset_index(drop=True)
