"""Training-time augmentation of whole batches on the training device, per sample.

kornia.augmentation draws one set of parameters per image of a batch (crop box, jitter
strengths, erased patch), which is what augmentation needs; torchvision.transforms.v2 draws
one set per call, so it would crop a whole batch alike. kornia's TrivialAugment and RandAugment
pick their ops once per call, so `_PerImage` picks them per image and runs each op on the
images that picked it. MixUp and CutMix mix pairs of images with one ratio per batch by design,
so they come from torchvision.transforms.v2 with their soft labels. Every draw comes from the
torch RNG seeded by a hash of (seed, rank, epoch, step) inside `fork_rng`: a resumed run draws
the same, DDP ranks draw differently, and the global RNG (dropout) is left where it was. kornia
is an optional extra.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from finetune.config.schema import AugmentConfig, Config
from finetune.errors import FinetuneError


class Augment:
    def __init__(self, cfg: AugmentConfig, size: int, num_classes: int, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank
        self.pixels = _pixel_ops(cfg, size)
        self.mixer = _mixer(cfg, num_classes)

    @classmethod
    def for_run(cls, cfg: Config, num_classes: int, rank: int) -> Augment | None:
        """The run's augmentation, or None when the config asks for none."""
        if not cfg.data.augment.active:
            return None
        return cls(cfg.data.augment, cfg.data.image_size, num_classes, cfg.seed, rank)

    def images(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Per-image augmentation of a float batch in [0, 1]."""
        if not len(self.pixels):
            return x
        with self._drawing(x.device, epoch, step, salt=1):
            return self.pixels(x)

    def mix(self, x: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): mixed images with soft targets, or the labels as they were.

        Train accuracy should score the unmixed `labels`, and say so: mixed images have no one label.
        """
        if self.mixer is None:
            return x, labels
        with self._drawing(x.device, epoch, step, salt=2):
            return self.mixer(x, labels)

    @contextlib.contextmanager
    def _drawing(self, device: torch.device, epoch: int, step: int, salt: int) -> Iterator[None]:
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_stream_seed(self.seed, self.rank, epoch, step, salt))
            yield


def _stream_seed(*key: int) -> int:
    """A 63-bit seed per key: a hash, so no two keys share a stream (an affine mix of them did)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") >> 1


def _pixel_ops(cfg: AugmentConfig, size: int) -> nn.Sequential:
    ops: list[nn.Module] = []
    if cfg.random_resized_crop or cfg.color_jitter or cfg.trivial_augment or cfg.rand_augment or cfg.random_erasing:
        try:
            import kornia.augmentation as K
            from kornia.augmentation.auto import RandAugment, TrivialAugment
            from kornia.augmentation.auto.rand_augment.rand_augment import default_policy as rand_policy
            from kornia.augmentation.auto.trivial_augment.trivial_augment import default_policy as trivial_policy
        except ImportError:
            raise FinetuneError("data.augment: kornia is not installed; pip install 'finetune[augment]'") from None
        if cfg.random_resized_crop:
            crop = cfg.random_resized_crop
            ops.append(K.RandomResizedCrop((size, size), scale=tuple(crop.scale), ratio=tuple(crop.ratio)))
        if cfg.color_jitter:
            j = cfg.color_jitter
            ops.append(K.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue, p=1.0))
        if cfg.trivial_augment:
            ops.append(_PerImage([TrivialAugment(policy=[op]) for op in trivial_policy], n=1))
        if cfg.rand_augment:
            ops.append(_PerImage([RandAugment(n=1, m=10, policy=[op]) for op in rand_policy], n=2))
        if cfg.random_erasing:
            ops.append(K.RandomErasing(p=cfg.random_erasing))
    return nn.Sequential(*ops)


class _PerImage(nn.Module):
    """`n` of `ops` per image, drawn without replacement and applied in the order drawn.

    kornia's policies apply one draw of ops to a whole batch; here each image draws its own, and
    each op runs once per round on the images that drew it (at most n * len(ops) calls a batch).
    """

    def __init__(self, ops: list[nn.Module], n: int):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picks = torch.rand(len(x), len(self.ops)).argsort(1)[:, : self.n]  # drawn on the CPU: no device sync
        out = x.clone()
        for round_picks in picks.T:
            for index, op in enumerate(self.ops):
                rows = (round_picks == index).nonzero().squeeze(1)
                if len(rows):
                    rows = rows.to(x.device, non_blocking=True)
                    out[rows] = op(out[rows])
        return out


def _mixer(cfg: AugmentConfig, num_classes: int) -> nn.Module | None:
    from torchvision.transforms import v2

    mixers = [v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []
    mixers += [v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else []
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
