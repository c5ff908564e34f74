"""`finetune plan`: the schedule a config will run, epoch by epoch, before paying for it.

It asks the same units `train` asks (runtime/resolve.py for precision, memory format and LR scale,
model/schedule.py for groups and LRs, training/features.py for the cache rule) on a weightless model, so the
two cannot disagree; no image is decoded, no weights are read and nothing is measured: a
runtime that `train` will measure shows as such (with the cache sized for fp32 until then).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch.nn.modules.batchnorm import _BatchNorm

from finetune.config.schema import Config
from finetune.data.sources import split_sizes
from finetune.model.build import check_model_config, skeleton
from finetune.model.schedule import Group, Schedule
from finetune.runtime.distributed import SINGLE, Ranks
from finetune.runtime.resolve import Subject, resolve_runtime
from finetune.training.batches import steps_per_epoch
from finetune.training.features import CachePlanner


@dataclass
class EpochPlan:
    epoch: int
    stage: str
    trainable: list[str]  # the modules of the groups that train
    trainable_params: int
    lr_start: dict[str, float]
    lr_end: dict[str, float]
    bn_train: str  # BatchNorm layers in train mode, "k/N"
    cache: str
    runtime: str  # precision and memory format, or that train will measure them


@dataclass
class Plan:
    steps_per_epoch: int
    train_size: int
    groups: list[dict[str, Any]]
    epochs: list[EpochPlan]
    runtime: str  # one line: the choice and how it was decided, or that train will measure it
    accumulate_steps: int  # batches per optimizer step; steps_per_epoch counts optimizer steps


def subject_of(cfg: Config) -> Subject:
    """The run's model, weightless (nothing is read or downloaded), and its split sizes."""
    check_model_config(cfg.model)
    names, n_train, n_val = split_sizes(cfg.data, cfg.task == "multilabel")
    built = skeleton(cfg.model, len(names))
    return Subject(built.model, built.head_name, n_train, n_val)


def make_plan(cfg: Config, ranks: Ranks = SINGLE) -> Plan:
    """The run as each of `ranks.world` processes will train it."""
    subject = subject_of(cfg)
    n_train, n_val = subject.n_train, subject.n_val
    runtime = resolve_runtime(cfg, subject, ranks, measure=False)
    model = subject.model.to(memory_format=runtime.layout)
    steps = steps_per_epoch(n_train, cfg.data.batch_size, ranks.world, cfg.train.accumulate_steps)
    schedule = Schedule(cfg.train, model, subject.head_name, steps, runtime.lr_scale)
    groups = [group_row(schedule, g, cfg) for g in schedule.groups]
    while (waiting := schedule.pending()) is not None:  # the epoch rows: each plateau stage at its earliest
        schedule.start(waiting.name, schedule.window(waiting)[0])
    caches = CachePlanner(cfg, schedule, model, n_train, n_val, runtime)
    shown = "measured by train" if runtime.decided_by == "pending" else runtime.describe()
    sizes = dict(model.named_parameters())
    bns = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    rows = []
    for epoch in range(1, cfg.train.epochs + 1):
        active = schedule.active(epoch)
        first = schedule.global_step(epoch)
        bn_train = sum(schedule.module_trains(n, epoch) or not cfg.train.freeze_bn for n in bns)
        decision = caches.decide(epoch)
        rows.append(
            EpochPlan(
                epoch=epoch,
                stage=schedule.stage(epoch),
                trainable=[m for g in active for m in g.modules],
                trainable_params=sum(sizes[p].numel() for g in active for p in g.params),
                lr_start=schedule.lrs(first),
                lr_end=schedule.lrs(first + steps - 1),
                bn_train=f"{bn_train}/{len(bns)}",
                cache=decision.note,
                runtime=shown,
            )
        )
    return Plan(steps, n_train, groups, rows, runtime.note(), cfg.train.accumulate_steps)


def group_row(schedule: Schedule, group: Group, cfg: Config) -> dict[str, Any]:
    """A plateau stage shows its window: the epochs it can start at (the rows assume the first)."""
    start: int | str = group.epoch + 1 if group.epoch is not None else ""
    if group.plateau is not None:
        first, last = schedule.window(group)
        start = f"{first + 1}-{min(last + 1, cfg.train.epochs)}, on plateau of {cfg.checkpoint.monitor}"
    return {"group": group.name, "modules": ", ".join(group.modules), "trains from epoch": start, "base lr": group.lr}


def plan_table(plan: Plan) -> list[dict[str, Any]]:
    """One printable row per epoch, narrow enough for a terminal: what trains is the stage (the
    group table above lists each group's modules), LRs as `start>end` per group."""
    rows = []
    for e in plan.epochs:
        row = {"epoch": e.epoch, "stage": e.stage, "params": short_count(e.trainable_params)}
        row.update({f"lr {g}": _lr_cell(e.lr_start[g], e.lr_end[g]) for g in e.lr_start})
        row.update({"BN train": e.bn_train, "feature cache": e.cache})  # the runtime is one line above
        rows.append(row)
    return rows


def short_count(count: int) -> str:
    """11689512 -> 11.7M: the size at a glance, as fastai and timm print it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if round(count / size, 1) >= 1:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _lr_cell(start: float, end: float) -> str:
    if start == end:
        return "0" if start == 0 else f"{start:.1e}"
    return f"{start:.1e}>{end:.1e}"


def to_json(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)
