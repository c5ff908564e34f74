"""The epoch records of a run: one row each in results.csv."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class EpochRecord:
    epoch: int
    stage: str  # the group that joined last (`head` before any unfreeze)
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_balanced_acc: float
    trainable_params: int
    epoch_seconds: float
    feature_seconds: float = 0.0  # of epoch_seconds, spent computing cached activations
    feature_seconds_reused: float = 0.0  # what the cached activations it used cost the runs that computed them
    feature_cache: str = ""  # the stage's cache decision, as `finetune plan` prints it
    val_weights: str = "model"  # the weights validation scored: the model's, or their average (ema)
    next_stage: str = ""  # the stage that starts after this epoch, and why (its epoch, a plateau)
    is_best: bool = False
    lrs: dict[str, float] = field(default_factory=dict)  # each group's LR at the epoch's last step
    val_acc_per_class: dict[str, float] = field(default_factory=dict)
    val_extra: dict[str, float] = field(default_factory=dict)  # multilabel: val_map, val_f1_micro, val_f1_macro

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("val_extra"))
        row.update({f"lr_{name}": lr for name, lr in row.pop("lrs").items()})
        row.update({f"val_acc_{name}": acc for name, acc in row.pop("val_acc_per_class").items()})
        return row


TIMING = ("epoch_seconds", "feature_seconds", "feature_seconds_reused")  # the columns two runs of one config differ in


class ResultsLog:
    """The epoch rows of a run, kept in memory and in every last.pt; results.csv is written from them."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows = list(rows or [])

    def append(self, record: EpochRecord, best_epoch: int | None) -> None:
        self.rows.append(record.to_row())
        for row in self.rows:
            row["is_best"] = row["epoch"] == best_epoch

    def csv(self) -> str:
        return pd.DataFrame(self.rows).to_csv(index=False, float_format="%.6g")


JUDGE_RULES = {  # checkpoint.judge -> which epochs a run is judged over, as a report says it
    "last_stage": "over the epochs where every stage trains",
    "best": "at its best epoch",
    "final": "at its final epoch",
}


def judged_by(monitor: str, rule: str) -> str:
    """The rule in words, for the reports that rank runs by it."""
    return f"{monitor} {JUDGE_RULES[rule]} (checkpoint.judge: {rule})"


@dataclass(frozen=True)
class Judged:
    """What a run is judged by (checkpoint.judge): the monitored value, the epoch and stage it
    came from, and the final epoch's value, which orders runs whose judged values are equal."""

    rule: str
    value: float
    epoch: int
    stage: str
    final: float

    def describe(self, monitor: str) -> str:
        return f"judged {monitor} {self.value:.4f} at epoch {self.epoch} ({self.stage}; checkpoint.judge: {self.rule})"


def judge(rows: list[dict[str, Any]], monitor: str, maximize: bool, rule: str) -> Judged | None:
    """The run's judged value by `rule` over its epoch rows; None before any epoch with a number.
    `last_stage` takes the rows of the last row's stage: stages only add groups, so those are
    the epochs in which every stage the run reached trains. Equal values: the first epoch, as best.pt."""
    scored = [r for r in _window(rows, rule) if not math.isnan(r[monitor])]
    if not scored:
        return None
    pick = (max if maximize else min)(scored, key=lambda r: r[monitor])
    return Judged(rule, float(pick[monitor]), int(pick["epoch"]), str(pick["stage"]), float(rows[-1][monitor]))


def _window(rows: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    if rule == "final":
        return rows[-1:]
    if rule == "last_stage":
        return [r for r in rows if r["stage"] == rows[-1]["stage"]]
    return rows


def judged_order(value: float, final: float, maximize: bool) -> tuple[float, float]:
    """A sort key, best run first: the judged value, equal ones by the final epoch's value."""
    sign = -1.0 if maximize else 1.0
    return sign * value, sign * final


def confusion_figure(matrix: np.ndarray, class_names: list[str]) -> Figure:
    """Imports matplotlib and sklearn only here: a run that draws no figure starts 0.9 s sooner."""
    from matplotlib.figure import Figure
    from sklearn import metrics

    size = max(5.0, 0.6 * len(class_names) + 2)
    fig = Figure(figsize=(size, size), layout="tight")
    ax = fig.subplots()
    metrics.ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=ax, colorbar=False, xticks_rotation=45, values_format="d"
    )
    ax.set_title("Confusion matrix (rows: true class)")
    return fig
