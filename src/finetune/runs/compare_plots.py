"""compare's learning curves and per-class accuracy (the trade-off plot is compare.py's: it shows
the column runs are judged by). matplotlib is imported inside each function: a command that
draws nothing starts sooner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from finetune.runs.compare_text import cut_middle
from finetune.runs.discover import Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LABEL = 40  # characters of a run's name or setting a figure shows
CURVES = ("acc", "loss")
STYLES = {"val": "-", "train": "--"}


def plot_curves(lines: dict[str, list[Run]]) -> Figure:
    """Accuracy and loss per epoch, a colour per line: a run, or the runs that repeat one setting
    over seeds or folds as their mean inside a min-max band. Val solid, train dashed, each new
    stage (an unfreeze) dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="tight")
    axes = dict(zip(CURVES, fig.subplots(1, 2), strict=True))
    for i, (name, runs) in enumerate(lines.items()):
        frame = pd.concat([run.results for run in runs])
        for curve, ax in axes.items():
            for split in STYLES:
                if f"{split}_{curve}" in frame:
                    stats = frame.groupby("epoch")[f"{split}_{curve}"].agg(["mean", "min", "max", "count"])
                    _mean_line(ax, stats, name, split, f"C{i}")
            for epoch in sorted({e for run in runs for e in _stage_starts(run.results)}):
                ax.axvline(epoch - 0.5, color=f"C{i}", linestyle=":", alpha=0.7, label=f"_stage {name}")
    for curve, ax in axes.items():
        title = {"acc": "Accuracy", "loss": "Loss"}[curve]
        ax.set(title=title, xlabel="epoch", ylabel=title.lower())
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    _legend(axes["acc"], title="solid: val, dashed: train, dotted: a stage starts", fontsize="small")
    return fig


def _mean_line(ax: Axes, stats: pd.DataFrame, name: str, split: str, color: str) -> None:
    """The runs' mean at each epoch, inside a band from their min to their max where there are several."""
    label = name if split == "val" else f"_{split} {name}"  # the legend names each colour once
    ax.plot(stats.index, stats["mean"], linestyle=STYLES[split], marker="o", markersize=3, color=color, label=label)
    if stats["count"].max() > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, lw=0, label=f"_band {name}")


def _stage_starts(results: pd.DataFrame) -> list[int]:
    """The epochs at which a stage after the first begins."""
    return results.loc[results["stage"].ne(results["stage"].shift()), "epoch"].iloc[1:].tolist()


def plot_per_class(table: pd.DataFrame) -> Figure:
    """Grouped bars: final accuracy per class, one bar per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8, 0.9 * len(table) * max(1, len(table.columns) / 2)), 4.5), layout="tight")
    ax = fig.subplots()
    table.plot.bar(ax=ax, width=0.8, rot=30)
    ax.set(title="Final validation accuracy per class", xlabel="class", ylabel="accuracy", ylim=(0, 1.05))
    _legend(ax, title="run", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def _legend(ax: Axes, **options: Any) -> None:
    """A legend of names cut to LABEL characters; the lines keep theirs whole."""
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [cut_middle(label, LABEL) for label in labels], **options)
