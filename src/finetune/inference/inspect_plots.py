"""inspect's pictures: images with their Grad-CAM beside them, the confused pairs, the
reliability diagram. matplotlib is imported inside each function, as the rest of finetune does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.inference.calibration import Bins, CalibrationReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from finetune.data.imageset import ImageSet
    from finetune.inference.predict import Predictor

PER_ROW = 3  # image + overlay pairs per row
CAM_ALPHA = 0.45
NAMED = 4  # predicted labels a caption names: more run into the next image


@dataclass
class Shown:
    """One image as the model saw it, with its scores and, where computed, its Grad-CAM."""

    image: np.ndarray  # (H, W, 3) floats in [0, 1], at the model's input size
    cam: np.ndarray | None  # (H, W) in [0, 1] for the predicted class
    true: str
    predicted: str
    probability: float  # of the predicted class
    true_probability: float
    loss: float

    @property
    def right(self) -> bool:
        return self.true == self.predicted

    def caption(self) -> str:
        return (
            f"true {self.true}, pred {self.predicted} {self.probability:.2f}\n"
            f"loss {self.loss:.2f}, p({self.true}) {self.true_probability:.2f}"
        )


@dataclass
class ShownLabels:
    """One image of a multilabel model: its labels, the ones predicted (with probabilities), and
    the Grad-CAM of the one label `cam_for` says why it was drawn for."""

    image: np.ndarray
    cam: np.ndarray | None
    true: list[str]
    predicted: list[tuple[str, float]]  # at or above their thresholds, most probable first
    cam_for: str  # e.g. "missed pet 0.04": the label the map is for, and why
    loss: float  # binary cross-entropy, the mean over labels

    @property
    def right(self) -> bool:
        return sorted(self.true) == sorted(name for name, _ in self.predicted)

    def caption(self) -> str:
        named = [f"{name} {p:.2f}" for name, p in self.predicted[:NAMED]]
        more = len(self.predicted) - NAMED
        predicted = ", ".join(named + ([f"+{more} more"] if more > 0 else [])) or "none"
        return f"true {', '.join(self.true) or 'none'}\npred {predicted}\nloss {self.loss:.2f}; CAM: {self.cam_for}"


def model_view(val: ImageSet, predictor: Predictor, indices: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """The images at `indices` as the model takes them (inputs) and as they are drawn (pixels)."""
    images = next(iter(val.batches([torch.tensor(indices)])))
    inputs = predictor.transform(images)
    mean, std = predictor.transform.mean, predictor.transform.std
    return inputs, (inputs * std + mean).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _blank(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _empty(fig: Figure, text: str) -> Figure:
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def shown_figure(
    items: list[Shown] | list[ShownLabels], title: str, cam_note: str = "Grad-CAM for the predicted class"
) -> Figure:
    """Each image beside its Grad-CAM overlay, captioned with true and predicted class,
    probability and loss; a wrong prediction's caption in red."""
    rows = max(1, -(-len(items) // PER_ROW))
    fig = _figure(4.4 * min(PER_ROW, max(1, len(items))), 2.5 * rows + 0.4)
    fig.suptitle(f"{title} (right: {cam_note})")
    if not items:
        return _empty(fig, "no images to show")
    axes = fig.subplots(rows, 2 * min(PER_ROW, len(items)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, item in enumerate(items):
        image_ax, cam_ax = axes[i // PER_ROW, 2 * (i % PER_ROW)], axes[i // PER_ROW, 2 * (i % PER_ROW) + 1]
        image_ax.imshow(item.image)
        image_ax.set_title(item.caption(), fontsize=8, loc="left", color="black" if item.right else "crimson")
        if item.cam is not None:
            cam_ax.imshow(item.image)
            cam_ax.imshow(item.cam, cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
    return fig


def confused_figure(pairs: list[tuple[str, list[Shown], list[Shown]]]) -> Figure:
    """A row per confused pair: images of the true class taken for the other (worst first),
    then images of the other class it got right, for a look at what it mixes up."""
    examples = max([len(wrong) for _, wrong, _ in pairs] + [len(right) for _, _, right in pairs] + [1])
    fig = _figure(1.5 * (2 * examples + 1), 1.9 * max(1, len(pairs)) + 0.3)
    if not pairs:
        return _empty(fig, "no confusions: every image was classified right")
    axes = fig.subplots(len(pairs), 2 * examples + 1, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (title, wrong, right) in enumerate(pairs):
        axes[row, 0].set_title(title, loc="left", fontsize=9)
        for column, item in enumerate(wrong):
            _thumb(axes[row, column], item, f"{item.true} → {item.predicted} {item.probability:.2f}", "crimson")
        for column, item in enumerate(right):
            _thumb(axes[row, examples + 1 + column], item, f"a right {item.predicted} {item.probability:.2f}", "black")
    return fig


def _thumb(ax: Axes, item: Shown, label: str, color: str) -> None:
    ax.imshow(item.image)
    ax.set_xlabel(label, fontsize=7, color=color)
    ax.axis("on")
    _blank(ax)


def reliability_figure(
    bins_at: Callable[[float], Bins], calibration: CalibrationReport, axes: tuple[str, str] = ("confidence", "accuracy")
) -> Figure:
    """Accuracy against confidence per bin (`axes` names them), before and after temperature
    scaling (fitted on these images), `bins_at(T)` giving the bins: bars under the diagonal are
    over-confidence."""
    fig = _figure(10, 4.3)
    panels = (
        ("before: temperature 1", 1.0, calibration.ece_before),
        (f"after: temperature {calibration.temperature:.3g}", calibration.temperature, calibration.ece_after_fit),
    )
    for ax, (title, t, ece) in zip(fig.subplots(1, 2), panels, strict=True):
        bins = bins_at(t)
        width = 1 / calibration.bins
        centers = (np.arange(calibration.bins) + 0.5) * width
        used = np.array(bins.count) > 0
        accuracy = np.where(used, bins.accuracy, np.nan)
        gap = np.where(used, np.array(bins.confidence) - np.array(bins.accuracy), np.nan)
        ax.bar(centers, accuracy, width=width, edgecolor="black", alpha=0.75, label=axes[1])
        ax.bar(
            centers,
            gap,
            bottom=accuracy,
            width=width,
            color="crimson",
            alpha=0.3,
            hatch="//",
            label=f"gap to {axes[0]}",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=axes[0], ylabel=axes[1], title=f"{title}, ECE {ece:.3f}")
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle(f"Reliability on {calibration.images} images ({calibration.bins} bins)")
    return fig
