"""Everything a run writes, in one place: config.yaml, best.pt, last.pt, results.csv,
summary.json (each atomically) and, with `log.tensorboard`, a TensorBoard event stream, with
`tracking.mlflow` each epoch to MLflow; and what it drops once it ends (`checkpoint.keep`).
Under DDP only rank 0 has a writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs.checkpoint import save_checkpoint
from finetune.runs.results import ResultsLog, confusion_figure
from finetune.runs.rundir import create_run_dir, ended_for_good
from finetune.runs.tracking import Tracker

BOARD_COLUMNS = {  # results.csv column -> TensorBoard tag
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "val_balanced_acc": "val/balanced_acc",
    "val_map": "val/map",  # multilabel's
    "val_f1_micro": "val/f1_micro",
    "val_f1_macro": "val/f1_macro",
    "epoch_seconds": "time/epoch_seconds",
}
DROPPED = {"all": (), "best": ("last.pt",), "results": ("last.pt", "best.pt")}  # checkpoint.keep -> files


def dropped(keep: str, summary: dict[str, Any], trial: bool) -> tuple[str, ...]:
    """The files a run that has ended drops by `checkpoint.keep`. last.pt, with its optimizer
    state the largest file, serves only to continue the run, so `auto` drops it where nothing
    can: a tune trial (a study never trains a trial again), a pruned or early-stopped run."""
    if keep == "auto":
        keep = "best" if trial or ended_for_good(summary) else "all"
    return DROPPED[keep]


class RunWriter:
    def __init__(self, run_dir: Path, tracker: Tracker | None = None):
        """`tracker`: the run's MLflow run (tracking.mlflow), sent each epoch once it is written."""
        self.run_dir = Path(run_dir)
        self.board = None
        self.tracker = tracker

    def start(self, cfg: Config, steps_done: int) -> None:
        """Create the run dir; open the event stream, dropping the events a resume replays.

        Events are logged at the number of steps done, so those of steps after `steps_done`
        (written before a kill, trained again now) go; the one at `steps_done` stays. A run
        killed before its first checkpoint restarts at 0, and its earlier events go too.
        """
        create_run_dir(self.run_dir, cfg)
        if cfg.log.tensorboard:
            self.board = _summary_writer(self.run_dir / "tensorboard", steps_done + 1)

    def best(self, portable: dict[str, Any], confusion: np.ndarray | None, step: int) -> None:
        save_checkpoint(self.run_dir / "best.pt", portable)
        if self.board and confusion is not None:  # multilabel has none
            figure = confusion_figure(confusion, portable["class_names"])
            self.board.add_figure("val/confusion_matrix_at_best", figure, step)

    def last(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "last.pt", state)

    def step(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        if self.board:
            self.board.add_scalar("train/step_loss", loss, step)
            for group, lr in lrs.items():
                self.board.add_scalar(f"lr/{group}", lr, step)

    def epoch(self, state: dict[str, Any], log: ResultsLog, summary: dict[str, Any], step: int) -> None:
        """last.pt first: results.csv and summary.json never get ahead of what resume restores."""
        self.last(state)
        self.results(log)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.tracker:
            self.tracker.epochs(log.rows, summary)
        if self.board:
            row, before = log.rows[-1], log.rows[-2] if len(log.rows) > 1 else None
            for column, tag in BOARD_COLUMNS.items():
                if column in row:
                    self.board.add_scalar(tag, row[column], step)
            if before is None or before["stage"] != row["stage"]:
                self.board.add_text("stage", f"epoch {row['epoch']}: stage {row['stage']} starts", step)
            self.board.flush()

    def results(self, log: ResultsLog) -> None:
        atomic_write_text(self.run_dir / "results.csv", log.csv())

    def drop(self, names: tuple[str, ...]) -> None:
        for name in names:
            (self.run_dir / name).unlink(missing_ok=True)

    def close(self) -> None:
        if self.board:
            self.board.close()


def _summary_writer(folder: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FinetuneError(
            "log.tensorboard: tensorboard is not installed; pip install 'finetune[tensorboard]'"
        ) from None
    return SummaryWriter(str(folder), purge_step=purge_step)
