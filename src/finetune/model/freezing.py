"""Freezing as small functions on modules, after Lightning's BaseFinetuning.

What trains when is the schedule's answer (schedule.py); these functions apply it to a
model: which parameters take gradients, which modules are in train mode, and the optimizer
with named parameter groups per schedule group, all present from the first step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune.config.schema import TrainConfig
from finetune.model.schedule import Group, Schedule

NO_DECAY = "/no_decay"  # the part of a group that takes no weight decay: biases and norm weights
# Devices with fused optimizer kernels (one kernel per step, not a loop over tensors): a
# ResNet18's Adam step takes 7 ms fused on a 2-core Xeon against 19 ms unfused.
FUSED_DEVICES = ("cpu", "cuda")


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
    """Named groups per schedule group, in schedule order, at its step-0 LR. Each group holds
    its parameter names, so a checkpoint loads by name whatever the grouping."""
    params = dict(model.named_parameters())
    groups = [part for g in schedule.groups for part in _decay_parts(cfg, g, params, schedule.lr(g, 0))]
    fused = {"fused": True} if all(p.device.type in FUSED_DEVICES for p in params.values()) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.9, **fused)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr_head, **fused)


def decays(name: str, param: nn.Parameter) -> bool:
    """timm's and HF's rule: weight matrices and kernels decay; biases and norm weights (1-d) do not."""
    return param.ndim > 1 and not name.endswith(".bias")


def _decay_parts(cfg: TrainConfig, group: Group, params: dict[str, nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """The optimizer groups of one schedule group: with weight decay (and not
    `decay_norm_and_bias`), its biases and norm weights go to `<name>/no_decay`."""
    if cfg.weight_decay == 0 or cfg.decay_norm_and_bias:
        parts = {group.name: (list(group.params), cfg.weight_decay)}
    else:
        decayed = [n for n in group.params if decays(n, params[n])]
        rest = [n for n in group.params if not decays(n, params[n])]
        parts = {group.name: (decayed, cfg.weight_decay), group.name + NO_DECAY: (rest, 0.0)}
    return [
        {"name": name, "params": [(n, params[n]) for n in names], "lr": lr, "weight_decay": decay}
        for name, (names, decay) in parts.items()
        if names
    ]


def schedule_group(name: str) -> str:
    """The schedule group an optimizer group belongs to."""
    return name.removesuffix(NO_DECAY)


def set_lrs(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> None:
    """Each group's LR for global step `step`, straight from the schedule."""
    lrs = schedule.lrs(step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lrs[schedule_group(param_group["name"])]


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR of each schedule group (its `/no_decay` part shares it)."""
    return {schedule_group(g["name"]): g["lr"] for g in optimizer.param_groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, order: list[str]) -> None:
    """Load a saved optimizer state by parameter name, whatever groups it was saved in.

    `order`: the model's parameter names. Runs saved before groups held names have one group
    per schedule group, its parameters in model order; groups that had not joined yet are
    absent (no state: they never trained). The current groups keep their hyperparameters.
    """
    current = optimizer.state_dict()
    index = {n: i for g in current["param_groups"] for n, i in zip(g["param_names"], g["params"], strict=True)}
    state = {}
    for group in saved["param_groups"]:
        names = group.get("param_names") or _names_before_param_names(group["name"], current, order)
        state.update(
            {index[n]: saved["state"][i] for n, i in zip(names, group["params"], strict=True) if i in saved["state"]}
        )
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    _lay_out_like_params(optimizer)


def _lay_out_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's state its parameter's memory layout. The fused kernels read the
    state in the parameter's element order whatever its strides, so moments saved from a
    contiguous model and loaded into a channels_last one would be read scrambled."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _names_before_param_names(name: str, current: dict, order: list[str]) -> list[str]:
    """A saved group without names: the parameters of schedule group `name`, in model order."""
    position = {n: i for i, n in enumerate(order)}
    names = [n for g in current["param_groups"] if schedule_group(g["name"]) == name for n in g["param_names"]]
    return sorted(names, key=position.__getitem__)
