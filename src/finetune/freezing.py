"""Which parameters train in which epoch, and the optimizer groups that follow from it.

Small functions on modules, after Lightning's BaseFinetuning: freeze, make trainable, add
the backbone as its own named parameter group. Groups are named (`head`, `backbone`) and
always built in the same order for a phase, so a checkpoint taken after the unfreeze
restores into an optimizer with the same groups.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from finetune.config import TrainConfig

Phase = Literal["frozen", "unfrozen"]


def phase_for_epoch(cfg: TrainConfig, epoch: int) -> Phase:
    """Epochs count from 1; the backbone trains from epoch `unfreeze_epoch + 1`."""
    if not cfg.freeze_backbone:
        return "unfrozen"
    if cfg.unfreeze_epoch is None or epoch <= cfg.unfreeze_epoch:
        return "frozen"
    return "unfrozen"


def split_parameters(model: nn.Module, head_name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head, backbone) parameters, split by name."""
    prefix = head_name + "."
    head, backbone = [], []
    for name, param in model.named_parameters():
        (head if name.startswith(prefix) else backbone).append(param)
    return head, backbone


def set_requires_grad(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def apply_phase(model: nn.Module, head_name: str, phase: Phase) -> None:
    """Only the head trains while frozen; everything trains after the unfreeze."""
    head, backbone = split_parameters(model, head_name)
    set_requires_grad(head, True)
    set_requires_grad(backbone, phase == "unfrozen")


def set_train_mode(model: nn.Module, head_name: str, phase: Phase, freeze_bn: bool) -> None:
    """A frozen backbone with `freeze_bn` stays in eval mode: no BatchNorm running-stat drift."""
    model.train()
    if phase == "frozen" and freeze_bn:
        model.eval()
        model.get_submodule(head_name).train()


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(cfg: TrainConfig, model: nn.Module, head_name: str, phase: Phase) -> list[dict]:
    head, backbone = split_parameters(model, head_name)
    groups = [{"name": "head", "params": head, "lr": cfg.lr_head}]
    if phase == "unfrozen":
        groups.append({"name": "backbone", "params": backbone, "lr": cfg.lr_backbone})
    return groups


def build_optimizer(cfg: TrainConfig, model: nn.Module, head_name: str, phase: Phase) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model, head_name, phase)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr_head, weight_decay=cfg.weight_decay)


def unfreeze_into(optimizer: torch.optim.Optimizer, cfg: TrainConfig, model: nn.Module, head_name: str) -> None:
    """Make the backbone trainable and add it as the `backbone` group; the head keeps its state."""
    apply_phase(model, head_name, "unfrozen")
    optimizer.add_param_group(param_groups(cfg, model, head_name, "unfrozen")[1])


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}
