"""The epoch book: at each epoch's end, its row, whether it is the best, whether to stop early."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from finetune.config.schema import Config
from finetune.runs.checkpoint import MAXIMIZE, BestTracker
from finetune.runs.results import EpochRecord, ResultsLog, judge
from finetune.training.early_stopping import EarlyStopping
from finetune.training.evaluator import EvalResult
from finetune.training.features import FeatureCost


@dataclass
class EpochOutcome:
    record: EpochRecord
    metrics: dict[str, float]
    is_best: bool
    stopped: bool  # early stopping ends the run after this epoch
    confusion: np.ndarray


class EpochBook:
    def __init__(self, cfg: Config, saved: dict[str, Any] | None = None):
        """`saved`: last.pt, whose book entries continue (old runs named the tracker `saver`)."""
        saved = saved or {}
        self.cfg, self.monitor = cfg, cfg.checkpoint.monitor
        self.best = BestTracker(self.monitor, **saved.get("best", saved.get("saver", {})))
        self.stopping = EarlyStopping(cfg.train.early_stopping, self.monitor, **saved.get("stopping", {}))
        self.log = ResultsLog(saved.get("rows"))
        self.pruned: dict[str, Any] | None = saved.get("pruned")  # {epoch, reason}: tune's pruner ended the run

    def close(
        self,
        epoch: int,
        stage: str,
        new_stage: bool,
        train: tuple[float, float],
        result: EvalResult,
        seconds: float,
        features: FeatureCost,
        lrs: dict[str, float],
        trainable_params: int,
        feature_cache: str,
        last_stage: bool,
        next_stage: str,
    ) -> EpochOutcome:
        """`last_stage`: every stage has joined, so early stopping counts (never while a stage waits)."""
        metrics = result.metrics()
        is_best = self.best.update(epoch, metrics)
        last = self.cfg.train.epochs
        stopped = last_stage and self.stopping.update(epoch, metrics[self.monitor], new_stage, last)
        record = EpochRecord(
            epoch=epoch,
            stage=stage,
            train_loss=train[0],
            train_acc=train[1],
            val_loss=result.loss,
            val_acc=result.acc,
            val_balanced_acc=result.balanced_acc,
            trainable_params=trainable_params,
            epoch_seconds=seconds,
            feature_seconds=features.paid,
            feature_seconds_reused=features.reused,
            feature_cache=feature_cache,
            val_weights="ema" if self.cfg.train.ema else "model",
            next_stage=next_stage,
            lrs=lrs,
            val_acc_per_class=result.per_class,
            val_extra=result.extra,
        )
        self.log.append(record, self.best.best_epoch)
        return EpochOutcome(record, metrics, is_best, stopped, result.confusion)

    def prune(self, epoch: int, reason: str) -> None:
        """End the run after `epoch` as early stopping would; last.pt keeps it, so a resume finds it complete."""
        self.pruned = {"epoch": epoch, "reason": reason}

    def state(self) -> dict[str, Any]:
        stopping, rows = self.stopping.state(), self.log.rows
        return {"best": self.best.state(), "stopping": stopping, "rows": rows, "pruned": self.pruned}

    def stopped_early(self) -> dict[str, Any] | None:
        return self.stopping.report()

    def ended(self) -> bool:
        """Whether early stopping or a prune ended the run before its last epoch."""
        return self.stopped_early() is not None or self.pruned is not None

    def summary(self) -> dict[str, Any]:
        """The run's results so far, for summary.json."""
        rows = self.log.rows
        seconds = [r["epoch_seconds"] for r in rows]
        stages = dict.fromkeys(r["stage"] for r in rows)
        return {
            "epochs_completed": len(rows),
            "epochs": self.cfg.train.epochs,
            "monitor": self.monitor,
            "best_epoch": self.best.best_epoch,
            "best_value": self.best.best_value,
            "judged": self.judged(),
            "best_val_acc": max((r["val_acc"] for r in rows), default=None),
            "final_val_acc": rows[-1]["val_acc"] if rows else None,
            "final_val_balanced_acc": rows[-1]["val_balanced_acc"] if rows else None,
            **({"final_val_map": rows[-1]["val_map"]} if rows and "val_map" in rows[-1] else {}),
            "stopped_early": self.stopped_early(),
            "pruned": self.pruned,
            "time_per_epoch": float(np.mean(seconds)) if seconds else None,
            "time_per_epoch_by_stage": {
                s: float(np.mean([r["epoch_seconds"] for r in rows if r["stage"] == s])) for s in stages
            },
            "total_seconds": float(sum(seconds)),
        }

    def judged(self) -> dict[str, Any] | None:
        """What tune and compare judge the run by (checkpoint.judge); None before an epoch ends."""
        judged = judge(self.log.rows, self.monitor, MAXIMIZE[self.monitor], self.cfg.checkpoint.judge)
        return None if judged is None else asdict(judged)


def epoch_line(r: EpochRecord, epochs: int, is_best: bool) -> str:
    """Multilabel: exact-match acc, then mAP and micro F1 in place of balanced accuracy."""
    extra = r.val_extra
    scores = f"map {extra['val_map']:.3f} f1 {extra['val_f1_micro']:.3f}" if extra else f"bal {r.val_balanced_acc:.3f}"
    return (
        f"epoch {r.epoch}/{epochs} {r.stage} | train loss {r.train_loss:.4f} acc {r.train_acc:.3f} | "
        f"val loss {r.val_loss:.4f} acc {r.val_acc:.3f} {scores} | "
        f"{r.epoch_seconds:.1f}s" + (" | best" if is_best else "")
    )
