"""`finetune lr-find`: Leslie Smith's LR range test for the groups that join in one stage.

The groups joining in the stage train for `steps` optimizer steps while their LR rises
exponentially from `start` to `end` (that is the named group's LR; a group joining with it
keeps its ratio to it). The epochs before the stage are trained first, as `train` trains
them, so the ramp starts from the weights the stage would start from (fastai's advice: fit
the head, then unfreeze, then find the LR); groups that joined earlier keep the LR the
schedule gives them as the stage starts. The ramp stops once a running average of the loss
is 4x its minimum, or the loss is not finite. The suggestion is the classic "minimum / 10" read
from a centred moving average of the loss over a decade of LR (a running average lags the
ramp by a decade or more), with the minimum taken where the loss reaches its bottom, so noise
along a flat bottom does not move it.

The stage runs as `train` runs it: the same batches, numerics, freezing, accumulation and
clipping, and the same feature cache (a head or partial stage trains on cached activations,
so the frozen bottom is computed once; the head-input cache on disk is the one `train` then
reads). It trains a model of its own and restores the RNG states, so a `train` after it is
the same as a `train` alone. It writes no run.
"""

from __future__ import annotations

import dataclasses
import io
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure

from finetune.config.schema import Config, StageConfig, stage_name
from finetune.errors import FinetuneError
from finetune.files import atomic_write_bytes, atomic_write_text
from finetune.model.freezing import schedule_group
from finetune.model.schedule import Group
from finetune.runtime.hardware import resolve_device
from finetune.training.loop import Trainer
from finetune.training.session import Session

SMOOTHING = 0.9  # the running average the stop rule watches: about 10 steps
DIVERGED = 4.0  # stop once that average is this many times its minimum
FLOOR = 0.01  # the loss's bottom starts where it is within this share of its fall from its lowest


@dataclass
class RangeTest:
    """One ramp: the named group's LR and the loss at every step it took."""

    stage: str
    joining: dict[str, float]  # each ramped group's LR as a multiple of the stage group's
    base_lrs: dict[str, float]  # every group's configured LR, as the schedule derived it
    lrs: list[float]
    losses: list[float]
    seconds: float  # the ramp's steps
    setup_seconds: float  # the epochs before the stage and its feature cache
    epochs_before: int  # trained first, as `train` trains them
    cut: str | None  # the module whose inputs were cached
    ended: str  # why the ramp stopped

    @property
    def smoothed(self) -> list[float]:
        """The loss as a moving average over a decade of LR, centred: a running average would lag
        the ramp by its window, and a shorter one leaves batch noise that moves the minimum."""
        per_decade = 1 / math.log10(self.lrs[1] / self.lrs[0]) if len(self.lrs) > 1 else 1
        window = 2 * round(per_decade / 2) + 1
        return pd.Series(self.losses).rolling(window, center=True, min_periods=1).mean().tolist()

    @property
    def bottom(self) -> int:
        """The first step at which the smoothed loss is within 1% of its fall from its lowest:
        on a flat bottom, where the flat part starts, not where noise puts the minimum."""
        smoothed = self.smoothed
        lowest = min(smoothed)
        top = max(smoothed[: smoothed.index(lowest) + 1])
        return next(i for i, value in enumerate(smoothed) if value <= lowest + FLOOR * (top - lowest))

    @property
    def suggestion(self) -> float | None:
        """The LR at the bottom of the loss / 10: a decade below where the loss stops falling it
        still falls fast, and is far from diverging. None when the loss never fell."""
        smoothed = self.smoothed
        if min(smoothed) >= 0.99 * max(smoothed[: self.bottom + 1]):
            return None
        return self.lrs[self.bottom] / 10


def find_lr(cfg: Config, stage: str | None, steps: int = 100, start: float = 1e-7, end: float = 10.0) -> RangeTest:
    """Ramp the LR of `stage` (default: the first) over `steps` optimizer steps, on a model of its own."""
    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trainer = Session().prepare(cfg, Path(cfg.out_dir), write=False)
        began = time.perf_counter()
        group, epoch = reach(trainer, stage)
        cut = trainer.enter(epoch)
        setup = time.perf_counter() - began
        groups = trainer.schedule.groups
        joining = {g.name: g.lr / group.lr for g in groups if g.epoch == group.epoch}
        base = {g.name: g.lr for g in groups}
        test = RangeTest(group.name, joining, base, [], [], 0.0, setup, epoch - 1, cut and cut.cut, "")
        _ramp(trainer, test, epoch, cut, [start * (end / start) ** (i / (steps - 1)) for i in range(steps)])
    if not test.lrs:
        raise FinetuneError(f"lr-find: {test.ended} at the first step; lower --start-lr (was {start:g})")
    return test


def reach(trainer: Trainer, name: str | None) -> tuple[Group, int]:
    """Train the epochs before stage `name` (default: the first) as `train` would, so its groups
    ramp from the weights they would start from; the group and its first epoch."""
    names = [g.name for g in trainer.schedule.groups]
    if name is not None and name not in names:
        raise FinetuneError(f"lr-find --stage {name!r}: the config's stages are {', '.join(names)}; name one of them")
    name, epoch = name or names[0], 1
    while not next(g for g in trainer.schedule.groups if g.name == name).trains_in(epoch):
        if epoch > trainer.cfg.train.epochs or trainer.book.ended():
            why = "train would stop early before it" if trainer.book.ended() else "it did not start within train.epochs"
            raise FinetuneError(f"lr-find --stage {name}: {why} (after epoch {epoch - 1}); lr-find has nothing to ramp")
        trainer.run_epoch(epoch)
        epoch += 1
    return next(g for g in trainer.schedule.groups if g.name == name), epoch


def _ramp(trainer: Trainer, test: RangeTest, epoch: int, cut: torch.nn.Module | None, lrs: list[float]) -> None:
    """Train one optimizer step per LR until the smoothed loss diverges."""
    forward = cut if cut is not None else trainer.compiled
    others = trainer.schedule.lrs(trainer.schedule.global_step(epoch))  # groups that joined before
    batches, k = _cycle(trainer, epoch, cut), trainer.cfg.train.accumulate_steps
    average, lowest = 0.0, math.inf
    began = time.perf_counter()
    for i, lr in enumerate(lrs):
        for param_group in trainer.optimizer.param_groups:
            name = schedule_group(param_group["name"])
            param_group["lr"] = lr * test.joining[name] if name in test.joining else others[name]
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = _step(trainer, [next(batches) for _ in range(k)], forward, epoch, i * k)
        if not math.isfinite(loss):
            test.ended = f"the loss was {loss} at lr {lr:.2g}"
            break
        test.lrs.append(lr)
        test.losses.append(loss)
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        running = average / (1 - SMOOTHING ** (i + 1))  # debiased
        lowest = min(lowest, running)
        if running > DIVERGED * lowest:
            test.ended = f"the loss diverged at lr {lr:.2g}"
            break
    test.seconds = time.perf_counter() - began
    test.ended = test.ended or f"the ramp reached lr {lrs[-1]:.2g}"


def _step(trainer: Trainer, chunk: list[tuple[torch.Tensor, torch.Tensor]], forward, epoch: int, first: int) -> float:
    """One optimizer step over `chunk` (train.accumulate_steps batches), as the step runner takes it."""
    total = sum(len(index) for index, _ in chunk)
    loss = torch.zeros((), device=trainer.runtime.device)
    for n, (index, inputs) in enumerate(chunk):
        truth = trainer.labels[index]
        augment = trainer.steps.augment
        inputs, targets = augment.mix(inputs, truth, epoch, first + n) if augment else (inputs, truth)
        batch_loss, _ = trainer.steps.backward(forward, inputs, targets, truth, len(index) / total, True)
        loss += batch_loss * len(index) / total
    trainer.steps.optimizer_step()
    return loss.item()


def _cycle(trainer: Trainer, epoch: int, cut: torch.nn.Module | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The stage's first epoch's batches, again from its start when 100 steps outlast it."""
    while True:
        batches = trainer.batches.epoch(epoch, 0, cut, trainer.features.cache)
        yield from zip(batches.index, batches.inputs, strict=True)


def set_line(cfg: Config, test: RangeTest, lr: float, overrides: list[str] = ()) -> str:
    """`--set` arguments that give the ramped groups the suggested LR (and keep their ratios),
    after the `overrides` lr-find was given. In a stage list every stage gets its LR written
    out: a stage without `lr` follows the one before it (layer_lr_decay), and only the ramped
    stages were tested at a new LR."""
    values = {name: float(f"{lr * ratio:.2g}") for name, ratio in test.joining.items()}
    parts = list(overrides)
    stages = list(cfg.train.unfreeze or [])
    for name, value in values.items():
        if name == "head":
            parts.append(f"train.lr_head={value:g}")
        elif not stages:
            parts.append(f"train.lr_backbone={value:g}")
    if stages and set(values) - {"head"}:
        lrs = {**test.base_lrs, **values}
        listed = [_stage_dict(s, lrs[stage_name(s)]) for s in stages]
        parts.append(f"train.unfreeze={yaml.safe_dump(listed, default_flow_style=True, width=10**6).strip()}")
    return "--set " + " ".join(shlex.quote(p) for p in parts)


def _stage_dict(stage: StageConfig, lr: float) -> dict:
    """The stage as YAML would give it (only the keys that differ from their defaults), at `lr`."""
    default = StageConfig()
    given = {f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}
    return {**{k: v for k, v in given.items() if v != getattr(default, k)}, "lr": lr}


def save(test: RangeTest, out: Path) -> tuple[Path, Path]:
    """lr_find.csv (every step) and lr_find.png (loss against LR, the suggestion marked)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"step": range(1, len(test.lrs) + 1), "lr": test.lrs, "loss": test.losses})
    table["smoothed_loss"] = test.smoothed
    csv, png = out / "lr_find.csv", out / "lr_find.png"
    atomic_write_text(csv, table.to_csv(index=False))
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    ax.plot(test.lrs, test.losses, alpha=0.3, label="loss")
    ax.plot(test.lrs, test.smoothed, label="smoothed")
    if test.suggestion is not None:
        ax.axvline(test.suggestion, color="tab:red", linestyle="--", label=f"suggested {test.suggestion:.2g}")
    ax.set(xscale="log", xlabel=f"lr of {test.stage}", ylabel="train loss", title=f"LR range test: {test.stage}")
    ax.legend()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    atomic_write_bytes(png, image.getvalue())
    return csv, png
