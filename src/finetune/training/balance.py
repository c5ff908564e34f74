"""What counters class imbalance in a run: the balanced sampler, the loss's class weights, or both.

A balanced sampler already shows the model every class equally often; weighting the loss by
inverse frequency as well (`train.class_weights: auto`) would count the imbalance twice and
tilt the model toward the rare classes. So the sampler wins over `auto`; weights given
explicitly (a list or mapping) are the user's own and apply on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.data.sources import DataSplits, class_counts
from finetune.training.losses import build_criterion


@dataclass(frozen=True)
class Balance:
    sampler: str  # data.sampler
    class_weights: str | list | dict  # the train.class_weights the loss applies
    note: str  # one line for the run's start and summary.json; empty when the sampler shuffles


def decide_balance(cfg: Config) -> Balance:
    sampler, spec = cfg.data.sampler, cfg.train.class_weights
    if sampler == "shuffle":
        return Balance(sampler, spec, "")
    drawn = "data.sampler balanced: each epoch draws as many images as train has, classes equally likely"
    if spec == "auto":
        return Balance(sampler, "none", f"{drawn}; train.class_weights auto is off (the sampler balances classes)")
    if spec == "none":
        return Balance(sampler, spec, f"{drawn}; the loss is unweighted")
    return Balance(sampler, spec, f"{drawn}; the given train.class_weights weigh the loss too")


def balanced_loss(cfg: Config, data: DataSplits) -> tuple[nn.Module, torch.Tensor | None, Balance]:
    """The run's criterion and the class (or label) weights it applies, once the sampler has had
    its say."""
    balance = decide_balance(cfg)
    counts = class_counts(data.train.labels, data.num_classes)
    multilabel = cfg.task == "multilabel"
    names = data.class_names
    criterion, weights = build_criterion(cfg.train, balance.class_weights, counts, len(data.train), names, multilabel)
    return criterion, weights, balance
