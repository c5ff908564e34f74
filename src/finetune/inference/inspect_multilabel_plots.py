"""A multilabel inspection's own pictures: the labels it misses most, each label's
precision-recall curve, and mAP across the run's epochs. matplotlib is imported inside each
function, as the rest of finetune does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PR_PANELS = 12  # labels drawn in pr_curves.png: the most missed, then the rest in order
PR_PER_ROW = 4
MISSED_BARS = 20


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def missed_figure(missed: pd.DataFrame) -> Figure:
    """Missed (FN) and false (FP) images of the most missed labels, against each label's support."""
    rows = missed.head(MISSED_BARS)
    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4.2)
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.bar(x - 0.27, rows["support"], 0.27, color="lightgray", edgecolor="black", label="support")
    ax.bar(x, rows["fn"], 0.27, color="crimson", label="missed (FN)")
    ax.bar(x + 0.27, rows["fp"], 0.27, color="orange", label="false (FP)")
    ax.set_xticks(x, rows["label"], rotation=45, ha="right")
    ax.set(ylabel="images", title="Most missed labels at their thresholds")
    ax.legend(fontsize="small")
    return fig


def pr_curves_figure(probs: np.ndarray, present: np.ndarray, names: list[str], missed: pd.DataFrame) -> Figure:
    """Precision against recall per label, its AP in the title and its threshold's point marked;
    the PR_PANELS most missed labels when there are more."""
    from sklearn.metrics import precision_recall_curve

    chosen = [names.index(label) for label in missed["label"].head(PR_PANELS)]
    rows = -(-len(chosen) // PR_PER_ROW)
    columns = min(PR_PER_ROW, len(chosen))
    fig = _figure(3.2 * columns, 3.0 * rows + 0.4)
    fig.suptitle("Precision-recall per label (dot: its threshold)")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    facts = missed.set_index("label")
    for ax, j in zip(axes.flat, chosen, strict=False):
        ax.axis("on")
        row = facts.loc[names[j]]
        if row["support"] == 0:
            ax.text(0.5, 0.5, "no positive image", ha="center", va="center")
        else:
            precision, recall, _ = precision_recall_curve(present[:, j], probs[:, j])
            ax.step(recall, precision, where="post")
            ax.plot([row["recall"]], [row["precision"]], "o", color="crimson")
        ap = "-" if np.isnan(row["ap"]) else f"{row['ap']:.3f}"
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"{names[j]}: AP {ap}")
    return fig


def map_figure(results: pd.DataFrame) -> Figure:
    """Validation mAP and F1 per epoch from results.csv."""
    fig = _figure(7, 3.8)
    ax = fig.subplots()
    for column in ("val_map", "val_f1_micro", "val_f1_macro"):
        if column in results:
            ax.plot(results["epoch"], results[column], marker="o", label=column)
    ax.set(xlabel="epoch", ylim=(0, 1.02), title="Validation mAP and F1")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
