"""Frozen-feature cache: backbone outputs computed once per image and flip variant.

While the backbone is frozen and in eval mode its output depends only on the image and the
flip, so the head can train on stored features. Features are captured as the head's input
(a forward pre-hook), which holds for any torchvision classifier whose head is its last
Linear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from finetune.hardware import Runtime


class FeatureCache:
    def __init__(self, train: torch.Tensor, val: torch.Tensor):
        self.train = train  # (variants, N, D): variant 1 is the flipped image
        self.val = val  # (N, D)

    def train_inputs(self, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        variant = flips.long() if self.train.shape[0] > 1 else torch.zeros_like(index)
        return self.train[variant.to(self.train.device), index.to(self.train.device)]

    @classmethod
    def build(
        cls,
        model: nn.Module,
        head: nn.Module,
        runtime: Runtime,
        batches: Callable[[bool | None], Iterator[torch.Tensor]],
        hflip: bool,
    ) -> FeatureCache:
        """`batches(flip)` yields transformed train batches (flip True/False) or val (None)."""
        variants = [False, True] if hflip else [False]
        train = torch.stack([extract(model, head, runtime, batches(flip)) for flip in variants])
        return cls(train, extract(model, head, runtime, batches(None)))


def extract(model: nn.Module, head: nn.Module, runtime: Runtime, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    """The head's inputs for every batch; leaves the model in eval mode."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad(), runtime.autocast():
            for x in batches:
                model(x)
    finally:
        hook.remove()
    return torch.cat(captured)
