"""Stage changes at an epoch's end: a stage by epoch starts when its epoch comes, a plateau
stage when the stage before has settled; `restore_best` first puts back the weights of the
stage before's best epoch.

The decision is made on the evaluation every rank shares (rank 0's), so all ranks switch at
the same step. Its state (each stage's start, the count within the current stage, the
stage's best weights) goes into last.pt, so resume is exact in and right after a switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.model.schedule import Group, Schedule
from finetune.runs.checkpoint import is_improvement
from finetune.training.ema import WeightAverage, evaluated_weights


@dataclass
class StageChange:
    stage: str
    epoch: int  # the first epoch it trains
    restored: int | None  # the epoch whose weights came back, with restore_best

    def describe(self, why: str) -> str:
        back = f", weights of epoch {self.restored} restored" if self.restored is not None else ""
        return f"{self.stage} trains from epoch {self.epoch} ({why}{back})"


class StageSwitch:
    def __init__(self, schedule: Schedule, monitor: str, model: nn.Module, ema: WeightAverage | None = None):
        """With `ema`, the best epoch was scored on the average: those weights come back, and
        the average starts over from them."""
        self.schedule, self.monitor, self.model, self.ema = schedule, monitor, model, ema
        self.keep_weights = any(g.stage is not None and g.stage.restore_best for g in schedule.groups)
        self.epochs = 0  # epochs of the current stage
        self.best: float | None = None  # its best value, counting improvements above the next rule's min_delta
        self.bad_epochs = 0
        self.best_epoch: int | None = None  # its best epoch by the plain rule, for restore_best
        self.best_value: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def after_epoch(self, epoch: int, value: float) -> tuple[StageChange, str] | None:
        """Count `epoch` in its stage; the stage starting at `epoch + 1` and why, if one does."""
        self._count(epoch, value)
        group = self._next(epoch) if epoch < self.schedule.cfg.epochs else None  # no stage after the last epoch
        if group is None:
            return None
        why = "its epoch" if group.plateau is None else self._plateau_reason(group)
        if group.epoch is None:
            self.schedule.start(group.name, epoch)
        restored = None
        if group.stage is not None and group.stage.restore_best and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
            if self.ema is not None:
                self.ema.restart()
            restored = self.best_epoch
        return StageChange(group.name, epoch + 1, restored), why

    def _next(self, epoch: int) -> Group | None:
        """The group that joins after `epoch`: its fixed epoch came, or its plateau is reached."""
        for group in self.schedule.groups:
            if group.epoch == epoch and epoch > 0:
                return group
        waiting = self.schedule.pending()
        if waiting is None or self.schedule.window(waiting)[0] > epoch:
            return None
        return waiting if self._settled(waiting) else None

    def _settled(self, group: Group) -> bool:
        rule = group.plateau
        if self.epochs < rule.min_epochs:
            return False
        return self.bad_epochs >= rule.patience or (rule.max_epochs is not None and self.epochs >= rule.max_epochs)

    def _plateau_reason(self, group: Group) -> str:
        rule = group.plateau
        if self.bad_epochs >= rule.patience:
            return f"{self.monitor} plateaued for {self.bad_epochs} epoch(s)"
        return f"max_epochs {rule.max_epochs} reached"

    def _count(self, epoch: int, value: float) -> None:
        if self.schedule.starts_stage(epoch) or epoch == 1:
            self.epochs, self.best, self.bad_epochs = 0, None, 0
            self.best_epoch = self.best_value = self.best_weights = None
        self.epochs += 1
        waiting = self.schedule.pending()
        delta = waiting.plateau.min_delta if waiting is not None else 0.0
        if is_improvement(self.monitor, value, self.best, delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if is_improvement(self.monitor, value, self.best_value):
            self.best_value, self.best_epoch = value, epoch
            if self.keep_weights and self._stage_to_come(epoch):
                scored = evaluated_weights(self.model, self.ema)
                self.best_weights = {k: v.detach().cpu().clone() for k, v in scored.items()}

    def _stage_to_come(self, epoch: int) -> bool:
        """Whether a stage still starts after `epoch`: only then may its best weights come back."""
        return any(g.epoch is None or g.epoch >= epoch for g in self.schedule.groups)

    def state(self) -> dict[str, Any]:
        keys = ("epochs", "best", "bad_epochs", "best_epoch", "best_value", "best_weights")
        return {"starts": self.schedule.starts(), **{k: getattr(self, k) for k in keys}}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """From last.pt; runs saved before plateau stages have none (nothing waited then)."""
        if not saved:
            return
        self.schedule.restore_starts(saved["starts"])
        for key in ("epochs", "best", "bad_epochs", "best_epoch", "best_value", "best_weights"):
            setattr(self, key, saved[key])
