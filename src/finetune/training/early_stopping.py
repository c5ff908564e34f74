"""Early stopping on the monitored metric, with a fresh patience for every new stage."""

from __future__ import annotations

from typing import Any

from finetune.config.schema import EarlyStoppingConfig
from finetune.runs.checkpoint import is_improvement


class EarlyStopping:
    """Stops when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    A stage that unfreezes more of the model starts its own count against its own best: the
    first epochs after an unfreeze often dip before they improve.
    """

    def __init__(
        self,
        cfg: EarlyStoppingConfig,
        monitor: str,
        best: float | None = None,
        bad_epochs: int = 0,
        stopped_epoch: int | None = None,
        reason: str | None = None,
    ):
        self.cfg, self.monitor = cfg, monitor
        self.best, self.bad_epochs = best, bad_epochs
        self.stopped_epoch, self.reason = stopped_epoch, reason

    def update(self, epoch: int, value: float, new_stage: bool, last_epoch: int) -> bool:
        """Count this epoch; return whether training should stop after it.

        Patience running out on `last_epoch` stops nothing: the run simply ended, and a
        resume with more epochs continues it.
        """
        if self.cfg.patience is None:
            return False
        if new_stage:
            self.best, self.bad_epochs = None, 0
        if is_improvement(self.monitor, value, self.best, self.cfg.min_delta):
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < self.cfg.patience or epoch >= last_epoch:
            return False
        self.stopped_epoch = epoch
        self.reason = (
            f"{self.monitor} did not improve by more than {self.cfg.min_delta} for {self.cfg.patience} "
            f"epoch(s) of this stage (its best: {self.best:.4f})"
        )
        return True

    def state(self) -> dict[str, Any]:
        keys = ("best", "bad_epochs", "stopped_epoch", "reason")
        return {k: getattr(self, k) for k in keys}

    def report(self) -> dict[str, Any] | None:
        return None if self.stopped_epoch is None else {"epoch": self.stopped_epoch, "reason": self.reason}
