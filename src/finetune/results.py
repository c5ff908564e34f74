"""results.csv (one row per epoch) and summary.json, rewritten atomically after every epoch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.files import atomic_write_text

TIMING_COLUMNS = ("epoch_seconds",)


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
    is_best: bool = False
    lrs: dict[str, float] = field(default_factory=dict)  # each group's LR at the epoch's last step
    val_acc_per_class: dict[str, float] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.update({f"lr_{name}": lr for name, lr in row.pop("lrs").items()})
        row.update({f"val_acc_{name}": acc for name, acc in row.pop("val_acc_per_class").items()})
        return row


class ResultsLog:
    """The epoch rows of a run; the CSV on disk always equals the rows kept here."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None):
        self.path = Path(run_dir) / "results.csv"
        self.rows = list(rows or [])

    def append(self, record: EpochRecord, best_epoch: int | None) -> None:
        """Add a row in memory; `write` puts it on disk once last.pt holds it too."""
        self.rows.append(record.to_row())
        for row in self.rows:
            row["is_best"] = row["epoch"] == best_epoch

    def write(self) -> None:
        atomic_write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False, float_format="%.6g"))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
