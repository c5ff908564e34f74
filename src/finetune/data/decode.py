"""An image file -> the uint8 pixels a model sees.

Training (in memory and streamed), eval and predict all decode through `decode_file`, so a
model is served exactly the pixels it was trained on: resizing a large photo in another
library, or from another decoded scale, shifts the normalized inputs by up to 0.4. (A set of
small images all of one size is held at that size and upsampled per batch on the device;
PIL's upsampling here agrees with it to one grey level, the uint8 rounding.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def read_rgb(path: Path, bound: int | None = None) -> np.ndarray | None:
    """The image as RGB, None if it cannot be decoded; with `bound`, a large JPEG is decoded
    at a reduced scale no smaller than `bound` (PIL's draft), so a 2000x1500 photo never sits
    in memory at full size."""
    try:
        with Image.open(path) as img:
            if bound is not None:
                img.draft("RGB", (bound, bound))
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) uint8 image resized bilinearly by PIL (unchanged if already that size)."""
    if array.shape[:2] == (height, width):
        return array
    return np.array(Image.fromarray(array).resize((width, height), Image.BILINEAR))


def channels_first(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor, sharing memory."""
    return torch.from_numpy(array).permute(2, 0, 1)


def fit(array: np.ndarray, size: int) -> torch.Tensor:
    """An image read with `bound=size` -> the (3, size, size) uint8 tensor a model sees."""
    return channels_first(resized(array, size, size))


def decode_file(path: Path, size: int) -> torch.Tensor | None:
    """The (3, size, size) uint8 tensor for an image file, None if it cannot be decoded."""
    array = read_rgb(path, bound=size)
    return None if array is None else fit(array, size)
