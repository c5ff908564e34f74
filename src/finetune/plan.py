"""`finetune plan`: the schedule a config will run, epoch by epoch, before paying for it.

It asks the same units `train` asks (schedule.py for groups and LRs, features.py for the
cache rule) on a weightless model, so the two cannot disagree; no image is decoded and no
weights are read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.config import Config
from finetune.data import split_batches, split_sizes
from finetune.features import decide_cache
from finetune.hardware import Runtime
from finetune.models import check_model_config, skeleton
from finetune.schedule import Schedule


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


@dataclass
class Plan:
    steps_per_epoch: int
    train_size: int
    groups: list[dict[str, Any]]
    epochs: list[EpochPlan]


def make_plan(cfg: Config) -> Plan:
    check_model_config(cfg.model)
    names, n_train, n_val = split_sizes(cfg.data)
    built = skeleton(cfg.model, len(names))
    model = built.model.to(memory_format=torch.channels_last)
    steps = len(split_batches(torch.arange(n_train), cfg.data.batch_size))
    schedule = Schedule(cfg.train, model, built.head_name, steps)
    runtime = Runtime(torch.device("cpu"), "fp32" if cfg.precision == "fp32" else "bf16")  # 16-bit unless fp32
    sizes = dict(model.named_parameters())
    bns = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    rows = []
    decision = None
    for epoch in range(1, cfg.train.epochs + 1):
        active = schedule.active(epoch)
        first = (epoch - 1) * steps
        bn_train = sum(schedule.module_trains(n, epoch) or not cfg.train.freeze_bn for n in bns)
        if decision is None or epoch not in decision.epochs:  # decided once per stage, as the Trainer does
            decision = decide_cache(cfg, schedule, model, epoch, n_train, n_val, runtime)
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
            )
        )
    groups = [
        {"group": g.name, "modules": ", ".join(g.modules), "trains from epoch": g.epoch + 1, "base lr": g.lr}
        for g in schedule.groups
    ]
    return Plan(steps, n_train, groups, rows)


def plan_table(plan: Plan) -> list[dict[str, Any]]:
    """One printable row per epoch: LRs as `start > end` per group."""
    rows = []
    for e in plan.epochs:
        row = {"epoch": e.epoch, "stage": e.stage, "trains": ", ".join(e.trainable), "params": e.trainable_params}
        row.update({f"lr {g}": _lr_cell(e.lr_start[g], e.lr_end[g]) for g in e.lr_start})
        row.update({"BN train": e.bn_train, "feature cache": e.cache})
        rows.append(row)
    return rows


def _lr_cell(start: float, end: float) -> str:
    if start == end:
        return "0" if start == 0 else f"{start:.2e}"
    return f"{start:.2e} > {end:.2e}"


def to_json(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)
