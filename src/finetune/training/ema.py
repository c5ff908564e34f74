"""An exponential moving average of the weights (`train.ema`), which validation and best.pt use.

It is updated after every optimizer step from the live weights, which DDP keeps identical on
every rank, so every rank holds the same average. A frozen parameter does not change, so its
average stays its value: only trainable parameters are averaged, and buffers (BatchNorm
statistics) are copied, as timm's ModelEmaV3 and torch.optim.swa_utils do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from finetune.config.schema import EmaConfig


class WeightAverage:
    def __init__(self, model: nn.Module, cfg: EmaConfig):
        self.cfg, self.updates = cfg, 0
        self.live = model.state_dict(keep_vars=True)  # the model's own tensors, updated in place
        self.average = {k: v.detach().clone() for k, v in self.live.items()}
        self.buffers = [k for k, v in self.live.items() if not isinstance(v, nn.Parameter)]

    def decay(self) -> float:
        """The next update's decay; with warmup min(decay, (1 + n) / (10 + n)) after n updates,
        so the random or pretrained start fades within the first steps."""
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average of every trainable parameter towards it; copy the buffers."""
        trained = [k for k, v in self.live.items() if isinstance(v, nn.Parameter) and v.requires_grad]
        if trained:
            averages, params = [self.average[k] for k in trained], [self.live[k] for k in trained]
            torch._foreach_lerp_(averages, params, 1 - self.decay())
        for key in self.buffers:
            self.average[key].copy_(self.live[key])
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's own tensors (so a cut model's top uses it too), the live
        weights put back after, even when evaluation is interrupted."""
        live = {k: v.detach().clone() for k, v in self.live.items()}
        with torch.no_grad():
            for key, value in self.live.items():
                value.copy_(self.average[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in self.live.items():
                    value.copy_(live[key])

    def state_dict(self) -> dict[str, Any]:
        return {"weights": {k: v.detach().cpu() for k, v in self.average.items()}, "updates": self.updates}

    @torch.no_grad()
    def restart(self) -> None:
        """Average from the current weights on: a run that turns the average on at a resume."""
        for key, value in self.live.items():
            self.average[key].copy_(value)
        self.updates = 0

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for key, value in saved["weights"].items():
            self.average[key].copy_(value)
        self.updates = saved["updates"]


def evaluated_weights(model: nn.Module, ema: WeightAverage | None) -> dict[str, torch.Tensor]:
    """The weights validation scores: what best.pt holds."""
    return ema.average if ema is not None else model.state_dict()


def averaged(ema: WeightAverage | None) -> AbstractContextManager[None]:
    """Evaluation's weights: the average while one is kept."""
    return ema.applied() if ema is not None else nullcontext()
