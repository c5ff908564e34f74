"""An epoch's order (shuffled, or drawn class-balanced) and flips, its batches, and the batch
transform run on the training device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def epoch_plan(
    n: int, seed: int, epoch: int, hflip: bool, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order and per-sample flips for one epoch, a pure function of (seed, epoch).

    Deriving them from the epoch rather than a running generator is what lets a resumed run
    replay or continue an epoch exactly, and lets cached and uncached paths draw the same flips.
    With `weights` (sampling_weights) the order is n draws with replacement instead of a
    shuffle. The shuffle is drawn all the same, so the flips are the shuffled epoch's: its
    (image, flip) pairs are a subset of the shuffled epoch's, and the feature cache's budget,
    sized for shuffling, holds for both.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=gen)
    return order, flips


def sampling_weights(sampler: str, labels: torch.Tensor) -> torch.Tensor | None:
    """Per-image draw weights for `data.sampler`: None to shuffle; `balanced`, 1 / the image's
    class count, so every class present in training is drawn equally often in expectation."""
    if sampler == "shuffle":
        return None
    counts = torch.bincount(labels.cpu()).double()
    return 1.0 / counts[labels.cpu()]


def split_batches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """An epoch's batches; a last batch of one sample joins the one before it, since
    BatchNorm cannot train on a single sample (cached and uncached paths split alike)."""
    batches = order.split(batch_size)
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches = (*batches[:-2], torch.cat(batches[-2:]))
    return batches


class BatchTransform:
    """uint8 batch -> resized, flipped, normalized float32 batch, all on the training device."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        layout: torch.memory_format = torch.channels_last,
    ):
        self.size, self.layout = size, layout
        # float32 whatever the numbers came as (numpy float64 would make every batch float64,
        # which MPS cannot hold)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(
        self,
        images: torch.Tensor,
        flips: torch.Tensor | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`augment` (training only) works on floats in [0, 1], before resizing and normalizing."""
        x = images.to(self.device, non_blocking=True)
        if flips is not None:  # no `flips.any()` test: it would wait for the GPU every batch
            x = torch.where(flips.to(self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.float().div_(255.0)
        if augment is not None:
            x = augment(x)
        if x.shape[-2:] != (self.size, self.size):
            # antialiasing changes only a downscale; the plain kernel upscales (CIFAR's 32 px to
            # 224) the same to float rounding, 2.3x faster on a CPU
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=shrink, align_corners=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.layout)
