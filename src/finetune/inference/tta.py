"""Test-time augmentation: the views of an image batch whose logits are averaged.

`flip`: the image and its horizontal mirror. `crops`: ten views, the four corner crops and
the centre crop of the image resized to image_size / 0.875 (ImageNet's 224-of-256), each
image_size square, and their mirrors. Logits, not probabilities, are averaged: a view the
model is unsure of then weighs in by its margins, as timm's and fastai's TTA do.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2.functional import five_crop

from finetune.data.batching import BatchTransform

TTA_MODES = ("flip", "crops")
CROP_ENLARGE = 1 / 0.875


def tta_views(mode: str, images: torch.Tensor, inputs: torch.Tensor, transform: BatchTransform) -> list[torch.Tensor]:
    """Normalized views of a uint8 batch; `inputs` (its plain transform) is the first flip view."""
    if mode == "flip":
        return [inputs, _mirror(inputs, transform)]
    size = transform.size
    mean, std = transform.mean.flatten().tolist(), transform.std.flatten().tolist()
    enlarged = BatchTransform(round(size * CROP_ENLARGE), mean, std, transform.device, transform.layout)(images)
    crops = [crop.contiguous(memory_format=transform.layout) for crop in five_crop(enlarged, [size, size])]
    return [view for crop in crops for view in (crop, _mirror(crop, transform))]


def _mirror(inputs: torch.Tensor, transform: BatchTransform) -> torch.Tensor:
    return inputs.flip(-1).contiguous(memory_format=transform.layout)
