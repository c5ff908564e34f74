"""Training-time augmentation of whole batches on the training device, per sample.

kornia.augmentation draws one set of parameters per image of a batch (crop box, jitter
strengths, erased patch, TrivialAugment's op), which is what augmentation needs;
torchvision.transforms.v2 draws one set per call, so it would crop a whole batch alike. MixUp
and CutMix mix pairs of images with one ratio per batch by design, so they come from
torchvision.transforms.v2 with their soft labels. Every draw comes from the torch RNG seeded
by (seed, epoch, step) inside `fork_rng`: a resumed run draws the same, and the global RNG
(dropout) is left where it was. kornia is an optional extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from finetune.config import AugmentConfig
from finetune.errors import FinetuneError


class Augment:
    def __init__(self, cfg: AugmentConfig, size: int, num_classes: int, seed: int):
        self.seed = seed
        self.pixels = _pixel_ops(cfg, size)
        self.mixer = _mixer(cfg, num_classes)

    def images(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Per-image augmentation of a float batch in [0, 1]."""
        if not len(self.pixels):
            return x
        with self._drawing(x.device, epoch, step, salt=1):
            return self.pixels(x)

    def mix(self, x: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): mixed images with soft targets, or the labels as they were."""
        if self.mixer is None:
            return x, labels
        with self._drawing(x.device, epoch, step, salt=2):
            return self.mixer(x, labels)

    @contextlib.contextmanager
    def _drawing(self, device: torch.device, epoch: int, step: int, salt: int) -> Iterator[None]:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + step) * 3 + salt)
            yield


def _pixel_ops(cfg: AugmentConfig, size: int) -> nn.Sequential:
    ops: list[nn.Module] = []
    if cfg.random_resized_crop or cfg.color_jitter or cfg.trivial_augment or cfg.rand_augment or cfg.random_erasing:
        try:
            import kornia.augmentation as K
            from kornia.augmentation.auto import RandAugment, TrivialAugment
        except ImportError:
            raise FinetuneError("data.augment: kornia is not installed; pip install 'finetune[augment]'") from None
        if cfg.random_resized_crop:
            crop = cfg.random_resized_crop
            ops.append(K.RandomResizedCrop((size, size), scale=tuple(crop.scale), ratio=tuple(crop.ratio)))
        if cfg.color_jitter:
            j = cfg.color_jitter
            ops.append(K.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue, p=1.0))
        if cfg.trivial_augment:
            ops.append(TrivialAugment())
        if cfg.rand_augment:
            ops.append(RandAugment(n=2, m=10))
        if cfg.random_erasing:
            ops.append(K.RandomErasing(p=cfg.random_erasing))
    return nn.Sequential(*ops)


def _mixer(cfg: AugmentConfig, num_classes: int) -> nn.Module | None:
    from torchvision.transforms import v2

    mixers = [v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []
    mixers += [v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else []
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
