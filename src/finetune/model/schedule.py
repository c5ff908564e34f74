"""The schedule: which parameter groups train in which epoch, and every group's LR at every step.

One unit that `finetune train`, `finetune plan` and resume all ask, so they cannot disagree
(the role Lightning's BaseFinetuning plays for freezing). It is pure: built from the train
config, the model's module and parameter names and the steps per epoch, and every answer is
a function of (group, epoch) or (group, global step). Every group is in the optimizer from
the first step; a group that has not joined yet has LR 0 and `requires_grad=False`.

torch.optim.lr_scheduler's classes are not used: they step one stateful curve shared by all
groups from step 0, while here a group that joins at an unfreeze gets its own warmup and
then follows the rest of the run's curve. An LR that is a pure function of the step also
needs no scheduler state in last.pt: resume recomputes it exactly.
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass, replace

from torch import nn

from finetune.config.schema import StageConfig, TrainConfig, stage_name
from finetune.errors import FinetuneError

BACKBONE = "backbone"  # in a stage: every backbone parameter no other stage names
ONECYCLE_START = 1 / 25  # OneCycleLR's default div_factor
ONECYCLE_WARMUP = 0.3  # OneCycleLR's default pct_start, used when warmup_epochs is 0


@dataclass(frozen=True)
class Group:
    """One optimizer parameter group: the modules it owns and when it joins training."""

    name: str
    modules: tuple[str, ...]
    epoch: int | None  # trains from epoch `epoch + 1`; None: waits for a plateau
    lr: float
    params: tuple[str, ...]
    stage: StageConfig | None = None  # its train.unfreeze entry (None: the head, the shorthand)

    def trains_in(self, epoch: int) -> bool:
        return self.epoch is not None and epoch > self.epoch

    @property
    def plateau(self) -> StageConfig | None:
        """The plateau rule this group starts by, if it starts by one."""
        return self.stage if self.stage is not None and self.stage.on_plateau else None


class Schedule:
    def __init__(self, cfg: TrainConfig, model: nn.Module, head_name: str, steps_per_epoch: int, lr_scale: float = 1):
        self.cfg, self.lr_scale = cfg, lr_scale  # lr_scale: world size with train.scale_lr linear
        self.head_name = head_name
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.epochs * steps_per_epoch
        self.module_order = [name for name, _ in model.named_modules() if name]
        self.groups = _build_groups(cfg, model, head_name)
        _check_order(self)

    # ---- when plateau stages start -----------------------------------------------------------
    def pending(self) -> Group | None:
        """The next stage that waits for a plateau (stages join in order, so at most one is next)."""
        return next((g for g in self.groups if g.epoch is None), None)

    def start(self, name: str, epoch: int) -> None:
        """Stage `name` trains from epoch `epoch + 1`: its plateau was reached in `epoch`."""
        self.groups = [replace(g, epoch=epoch) if g.name == name else g for g in self.groups]

    def starts(self) -> dict[str, int | None]:
        """Each group's start as an epoch index (trains from `epoch + 1`), None if not yet: last.pt keeps it."""
        return {g.name: g.epoch for g in self.groups}

    def restore_starts(self, starts: dict[str, int | None]) -> None:
        for name, epoch in starts.items():
            if epoch is not None and any(g.name == name and g.epoch is None for g in self.groups):
                self.start(name, epoch)

    def window(self, group: Group) -> tuple[int, int]:
        """The earliest and latest epoch index `group` can start at, given the starts so far."""
        before = (0, 0)
        for g in self.groups:
            if g.epoch is not None:
                current = (g.epoch, g.epoch)
            elif g.plateau is not None:
                rule, last = g.plateau, self.cfg.epochs
                latest = last if rule.max_epochs is None else min(last, before[1] + rule.max_epochs)
                soonest = max(rule.min_epochs, rule.patience + 1)  # a stage's first epoch always improves
                if rule.max_epochs is not None:
                    soonest = min(soonest, rule.max_epochs)
                current = (min(last, before[0] + soonest), latest)
            if g is group:
                return current
            before = current
        raise KeyError(group.name)

    # ---- which groups train ----------------------------------------------------------------
    def active(self, epoch: int) -> list[Group]:
        return [g for g in self.groups if g.trains_in(epoch)]

    def stage(self, epoch: int) -> str:
        """The name of the group that joined last by this epoch (`head` before any unfreeze)."""
        return self.active(epoch)[-1].name  # groups are in joining order

    def starts_stage(self, epoch: int) -> bool:
        """Whether more of the model trains in `epoch` than in the epoch before."""
        return epoch > 1 and self.stage(epoch) != self.stage(epoch - 1)

    def global_step(self, epoch: int, step: int = 0) -> int:
        """Steps done before `step` of 1-based `epoch`: what LRs, resume and TensorBoard count."""
        return (epoch - 1) * self.steps_per_epoch + step

    def stage_epochs(self, epoch: int) -> range:
        """The epochs from `epoch` on during which the same groups may train (while a plateau
        stage waits, up to the latest epoch it can start)."""
        later = [g.epoch for g in self.groups if g.epoch is not None and g.epoch >= epoch]
        later += [self.window(g)[1] for g in self.groups if g.epoch is None]
        return range(epoch, min(later, default=self.cfg.epochs) + 1)

    def module_trains(self, name: str, epoch: int) -> bool:
        """Whether the group owning module `name` trains in this epoch."""
        for group in self.groups:
            if any(_inside(name, m) for m in group.modules if m != BACKBONE):
                return group.trains_in(epoch)
        rest = next((g for g in self.groups if BACKBONE in g.modules), None)
        return rest is not None and rest.trains_in(epoch)

    def cache_cut(self, epoch: int) -> str | None:
        """The module whose input may be cached this epoch: everything below it is frozen.

        The head while only the head trains; else the lowest training module in
        registration order (features.py checks the model really is a chain there). None when
        the whole backbone trains, or when frozen BatchNorm/dropout are in train mode.
        """
        if self.cfg.feature_cache == "off" or not self.cfg.freeze_bn:
            return None
        modules = [m for g in self.active(epoch) if g.name != "head" for m in g.modules]
        if BACKBONE in modules:
            return None
        return min(modules, key=self.module_order.index) if modules else self.head_name

    # ---- learning rates --------------------------------------------------------------------
    def lr(self, group: Group, step: int) -> float:
        """The LR of `group` at global step `step` (0-based)."""
        if group.epoch is None or step < group.epoch * self.steps_per_epoch:
            return 0.0
        joined = group.epoch * self.steps_per_epoch
        factor = self._curve(step)
        warmup = round(self.cfg.unfreeze_warmup_epochs * self.steps_per_epoch)
        if group.epoch > 0 and warmup > 0:
            factor *= min(1.0, (step - joined + 1) / warmup)
        return group.lr * self.lr_scale * factor

    def lrs(self, step: int) -> dict[str, float]:
        return {g.name: self.lr(g, step) for g in self.groups}

    def _curve(self, step: int) -> float:
        """The run's LR multiplier: warmup, then the named decay over the remaining steps."""
        s = self.cfg.scheduler
        warmup = round(s.warmup_epochs * self.steps_per_epoch)
        if s.name == "onecycle" and warmup == 0:
            warmup = round(ONECYCLE_WARMUP * self.total_steps)
        if step < warmup:
            start = ONECYCLE_START if s.name == "onecycle" else 0.0
            return start + (1 - start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        low = s.min_lr_ratio
        if s.name in ("cosine", "onecycle"):
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "linear":
            return 1 - (1 - low) * progress
        if s.name == "step":
            return s.gamma ** (step // max(1, round(s.step_epochs * self.steps_per_epoch)))
        return 1.0


def check_stages(cfg: TrainConfig, model: nn.Module, head_name: str) -> None:
    """Raise on a stage that names no module, overlaps another, holds the head or starts out of order."""
    Schedule(cfg, model, head_name, steps_per_epoch=1)


def _stage_configs(cfg: TrainConfig) -> list[tuple[str, tuple[str, ...], int | None, float | None, StageConfig | None]]:
    """(name, modules, epoch, lr or None, config) per stage in joining order; the shorthand is one
    `backbone` stage. Stages by epoch alone join in epoch order; with plateau stages, in list order."""
    if cfg.unfreeze is not None:
        stages = cfg.unfreeze
        if not any(s.on_plateau for s in stages):
            stages = sorted(stages, key=lambda s: s.epoch or 0)
        return [(stage_name(s), tuple(s.modules), None if s.on_plateau else s.epoch or 0, s.lr, s) for s in stages]
    if not cfg.freeze_backbone:
        return [(BACKBONE, (BACKBONE,), 0, cfg.lr_backbone, None)]
    if cfg.unfreeze_epoch is None:
        return []
    return [(BACKBONE, (BACKBONE,), cfg.unfreeze_epoch, cfg.lr_backbone, None)]


def _check_order(schedule: Schedule) -> None:
    """With plateau stages listed, a stage by epoch must start after the one before can."""
    for before, group in itertools.pairwise(schedule.groups[1:]):
        if group.epoch is None:
            continue
        latest = before.epoch if before.epoch is not None else schedule.window(before)[1]
        if before.epoch is None and before.plateau.max_epochs is None:
            raise FinetuneError(
                f"train.unfreeze: stage {group.name!r} starts at epoch {group.epoch + 1}, but {before.name!r} before "
                f"it has no max_epochs, so it may start later; give {before.name!r} max_epochs"
            )
        if group.epoch < latest or (before.epoch is None and group.epoch == latest):
            raise FinetuneError(
                f"train.unfreeze: stage {group.name!r} starts at epoch {group.epoch + 1}, but {before.name!r} before "
                f"it may start as late as epoch {latest + 1}; give {before.name!r} a smaller max_epochs or "
                f"{group.name!r} a later epoch"
            )


def _build_groups(cfg: TrainConfig, model: nn.Module, head_name: str) -> list[Group]:
    """The head group, then one group per stage with its parameters and LR (layer_lr_decay)."""
    stages = _stage_configs(cfg)
    _check_modules(stages, model, head_name)
    names = [n for n, _ in model.named_parameters()]
    owner = {n: "head" for n in names if _inside(n, head_name)}
    for name, modules, *_ in stages:
        owner.update({n: name for n in names if any(_inside(n, m) for m in modules if m != BACKBONE)})
    rest = [name for name, modules, *_ in stages if BACKBONE in modules]
    owner.update({n: rest[0] for n in names if rest and n not in owner})
    groups = [Group("head", (head_name,), 0, cfg.lr_head, tuple(n for n in names if owner.get(n) == "head"))]
    lr = cfg.lr_backbone / cfg.layer_lr_decay
    for name, modules, epoch, stage_lr, stage in stages:
        lr = stage_lr if stage_lr is not None else lr * cfg.layer_lr_decay
        params = tuple(n for n in names if owner.get(n) == name)
        if not params:
            raise FinetuneError(f"train.unfreeze: stage {name!r} holds no parameters to train; name other modules")
        groups.append(Group(name, modules, epoch, lr, params, stage))
    return groups


def _inside(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def stage_modules(model: nn.Module, head_name: str) -> list[str]:
    """The names a train.unfreeze stage takes besides `backbone`: modules with parameters that do
    not hold the head. `finetune modules` lists these, so it and every stage check agree."""
    return [
        name
        for name, module in model.named_modules()
        if name and not _inside(head_name, name) and next(module.parameters(), None) is not None
    ]


def _check_modules(stages: list, model: nn.Module, head_name: str) -> None:
    """Names a stage does not take (with close suggestions), the head inside a stage, overlapping stages."""
    known = {name for name, _ in model.named_modules() if name}
    valid = stage_modules(model, head_name)
    seen: list[tuple[str, str]] = []
    for stage, modules, *_ in stages:
        for module in modules:
            if module == BACKBONE:
                if any(m == BACKBONE for _, m in seen):
                    raise FinetuneError("train.unfreeze: `backbone` (the rest) may appear in one stage only")
            elif module not in valid:
                raise FinetuneError(f"train.unfreeze: stage {stage!r} {_refusal(module, known, valid, head_name)}")
            clash = next(
                (s for s, m in seen if BACKBONE not in (m, module) and (_inside(m, module) or _inside(module, m))), None
            )
            if clash is not None:
                raise FinetuneError(
                    f"train.unfreeze: stage {stage!r} module {module!r} overlaps stage {clash!r}; "
                    "give each module to one stage"
                )
            seen.append((stage, module))


def _refusal(module: str, known: set[str], valid: list[str], head_name: str) -> str:
    """Why a stage cannot take `module`, and where to find the names it can."""
    listing = "`finetune modules <config>` lists the names a stage takes"
    if module in known and _inside(head_name, module):
        return f"module {module!r} holds the head {head_name!r}, which always trains; name backbone modules only"
    if module in known:
        return f"module {module!r} has no parameters to train; {listing}"
    close = difflib.get_close_matches(module, valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? {listing}" if close else f"top-level: {_top_level(valid)}; {listing}"
    return f"names no module {module!r} of the model; {hint}"


def _top_level(known: list[str]) -> str:
    return ", ".join(n for n in known if "." not in n)
