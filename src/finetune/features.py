"""Frozen-feature cache: backbone outputs computed once per image and flip variant.

While the backbone is frozen and in eval mode its output depends only on the image and the
flip, so the head can train on stored features. Since each epoch's flips are a function of
(seed, epoch), the variants the frozen phase will use are known up front: exactly those are
computed, in the first frozen epoch, and later frozen epochs cost almost nothing. Features
are captured as the head's input (a forward pre-hook), which holds for any torchvision
classifier whose head is its last Linear. A disk store keyed by everything that determines
the features lets later runs and other configs reuse them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.checkpoint import load_checkpoint, save_checkpoint
from finetune.data import epoch_plan
from finetune.errors import FinetuneError
from finetune.hardware import Runtime


@dataclass
class FeatureCache:
    train: torch.Tensor  # (2, N, D): variant 1 is the flipped image
    have: torch.Tensor  # (2, N) bool: which variants are computed
    val: torch.Tensor  # (M, D)

    def train_inputs(self, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return self.train[flips.long().to(self.train.device), index.to(self.train.device)]

    def fill(self, needed: torch.Tensor, compute: Callable[[torch.Tensor, bool], torch.Tensor]) -> bool:
        """Compute the needed variants not yet held; return whether anything was computed."""
        missing = needed & ~self.have
        for variant in (0, 1):
            index = missing[variant].nonzero().flatten()
            if len(index):
                self.train[variant, index.to(self.train.device)] = compute(index, bool(variant))
                self.have[variant, index] = True
        return bool(missing.any())


def needed_variants(n: int, seed: int, epochs: Iterable[int], hflip: bool) -> torch.Tensor:
    """(2, N) mask of the (flip, image) pairs that these epochs will draw."""
    needed = torch.zeros(2, n, dtype=torch.bool)
    for epoch in epochs:
        flips = epoch_plan(n, seed, epoch, hflip)[1]
        needed[flips.long(), torch.arange(n)] = True
    return needed


def extract(model: nn.Module, head: nn.Module, runtime: Runtime, batches: Iterable[torch.Tensor]) -> torch.Tensor:
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


def cache_key(model: nn.Module, head_name: str, data_fingerprints: list[str], settings: str) -> str:
    """Digest of the backbone weights, the images and the transform/precision settings."""
    digest = hashlib.sha256("|".join([settings, *data_fingerprints]).encode())
    for name, tensor in model.state_dict().items():
        if not name.startswith(head_name + "."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureStore:
    """Feature caches on disk, one file per key, shared by every run under `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, key: str, device: torch.device) -> FeatureCache | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            state = load_checkpoint(path, required="train")
        except FinetuneError:
            return None  # an unreadable cache is recomputed, never fatal
        return FeatureCache(state["train"].to(device), state["have"], state["val"].to(device))

    def save(self, key: str, cache: FeatureCache) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"train": cache.train.cpu(), "have": cache.have, "val": cache.val.cpu()}
        save_checkpoint(self.folder / f"{key}.pt", state)
