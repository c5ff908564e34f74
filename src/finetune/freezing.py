"""Freezing as small functions on modules, after Lightning's BaseFinetuning.

What trains when is the schedule's answer (schedule.py); these functions apply it to a
model: which parameters take gradients, which modules are in train mode, and the optimizer
with one named parameter group per schedule group, all present from the first step.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.config import TrainConfig
from finetune.schedule import Schedule


def apply_stage(model: nn.Module, schedule: Schedule, epoch: int) -> None:
    """Parameters of the groups training in `epoch` take gradients; all others do not."""
    params = dict(model.named_parameters())
    trainable = {name for g in schedule.active(epoch) for name in g.params}
    for name, param in params.items():
        param.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, schedule: Schedule, epoch: int) -> None:
    """Train mode, except (with `freeze_bn`) the modules of groups not training yet: their
    BatchNorm statistics do not drift and their dropout stays off until their own stage."""
    model.train()
    if not schedule.cfg.freeze_bn:
        return
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None and not schedule.module_trains(name, epoch):
            module.eval()


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_optimizer(cfg: TrainConfig, model: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """One named group per schedule group, in schedule order, at its step-0 LR."""
    params = dict(model.named_parameters())
    groups = [
        {"name": g.name, "params": [params[n] for n in g.params], "lr": schedule.lr(g, 0)} for g in schedule.groups
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr_head, weight_decay=cfg.weight_decay)


def set_lrs(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> None:
    """Each group's LR for global step `step`, straight from the schedule."""
    for param_group, group in zip(optimizer.param_groups, schedule.groups, strict=True):
        param_group["lr"] = schedule.lr(group, step)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state by group name.

    Runs saved before every group was in the optimizer from step 0 hold only the groups
    that had joined; the others are added empty (no state: they never trained).
    """
    saved_groups = {g["name"]: g for g in saved["param_groups"]}
    next_id = sum(len(g["params"]) for g in saved["param_groups"])
    groups = []
    for current in optimizer.state_dict()["param_groups"]:
        group = saved_groups.get(current["name"])
        if group is None:
            group = {**current, "params": list(range(next_id, next_id + len(current["params"])))}
            next_id += len(current["params"])
        groups.append(group)
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
