"""Labelled images: decoded once into one uint8 tensor, or, over the memory budget, streamed
from their files by DataLoader workers that live as long as the set does.

Images in memory are one (N, 3, H, W) uint8 tensor so resizing, flipping and normalizing
happen on whole batches on the training device instead of per sample through PIL.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config.schema import DataConfig
from finetune.data.decode import channels_first, decode_file, fit, read_rgb
from finetune.errors import FinetuneError

SIZE_SAMPLE = 64  # image headers read to choose how decoded images are stored


@dataclass
class ImageSet:
    """Labels and their images: decoded once into memory as (N, 3, H, W) uint8, or, for a
    dataset over `data.memory_budget_mb`, image files decoded batch by batch by DataLoader
    workers (each to `size` x `size` as it is decoded)."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    size: int = 0
    workers: int = 0
    _stream: FileStream | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> ImageSet:
        """In-memory images move to the device once; streamed files stay files."""
        if self.images is None:
            return self
        return ImageSet(self.labels, self.images.to(device), self.files, self.size, self.workers)

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """uint8 image batches for these index batches, in order."""
        if self.images is not None:
            return (self.images[index.to(self.images.device)] for index in index_batches)
        if self._stream is None:
            self._stream = FileStream(self.files, self.size, self.workers)
        return self._stream.batches(index_batches)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        return self.batches(torch.arange(len(self)).split(batch_size))

    def fingerprint(self) -> str:
        """Digest of the content: the decoded pixels in memory, the file bytes when streamed
        (a file replaced with one of the same size and time, as `cp -p` does, is noticed)."""
        digest = hashlib.sha256(self.labels.numpy().tobytes())
        if self.images is not None:
            digest.update(self.images.cpu().contiguous().numpy().tobytes())
        else:
            digest.update(str(self.size).encode())
            with _pool(self.workers) as pool:
                for content in pool.map(Path.read_bytes, self.files):
                    digest.update(hashlib.sha256(content).digest())
        return digest.hexdigest()


class FileStream:
    """One DataLoader, and so one set of worker processes, for every pass over the files.

    Its batch sampler is a list refilled with each pass's index batches before the loader is
    iterated again (persistent workers), so an epoch starts no processes. A pass started
    while another is unfinished takes the loader over, and the older pass raises if resumed.
    """

    def __init__(self, files: list[Path], size: int, workers: int):
        self._feed: list[list[int]] = []
        # Workers draw nothing random, but a DataLoader seeds them from its generator, by
        # default the global one that dropout draws from: a private one keeps resume exact.
        private = torch.Generator().manual_seed(0)
        self.loader = DataLoader(
            _ImageFiles(files, size),
            batch_sampler=self._feed,
            num_workers=workers,
            collate_fn=torch.stack,
            generator=private,
            persistent_workers=workers > 0,  # 0: the main process loads, as PyTorch's DataLoader
        )
        self._passes = 0

    def batches(self, index_batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        self._passes += 1
        current = self._passes
        self._feed[:] = [index.tolist() for index in index_batches]
        loader = iter(self.loader)
        for _ in range(len(self._feed)):
            if self._passes != current:  # checked before drawing: the draw would be the newer pass's
                raise RuntimeError("another pass over these image files started before this one finished")
            yield next(loader)


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = decode_file(self.files[i], self.size)
        if image is None:  # passed the header check at scan time, failed to decode now
            warnings.warn(f"{self.files[i]} could not be decoded; a black image stands in", stacklevel=1)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        return image


@dataclass
class ImageFiles:
    """Image files and their labels, not yet decoded."""

    files: list[Path]
    labels: np.ndarray

    def storage_size(self, size: int) -> tuple[int, int]:
        """(height, width) to hold every image at in memory: their own size if a sample of
        headers spread over the folder all agree and fit in `size` (CIFAR stays 32 px and
        is resized per batch on the device), else `size` x `size`, resized at decode."""
        step = max(1, len(self.files) // SIZE_SAMPLE)
        sizes = {s for s in map(header_size, self.files[::step][:SIZE_SAMPLE]) if s is not None}
        if len(sizes) == 1 and max(next(iter(sizes))) <= size:
            width, height = sizes.pop()
            return height, width
        return size, size

    def estimate_mb(self, size: int) -> float:
        height, width = self.storage_size(size)
        return len(self.files) * 3 * height * width / 2**20

    def streamed(self, cfg: DataConfig) -> ImageSet:
        """Files decoded per batch later; unreadable headers are skipped now with one warning."""
        with _pool(cfg.num_workers) as pool:
            ok = list(pool.map(header_size, self.files))
        _warn_skipped([f for f, size in zip(self.files, ok, strict=True) if size is None])
        keep = [i for i, size in enumerate(ok) if size is not None]
        labels = label_tensor(self.labels[keep])
        files = [self.files[i] for i in keep]
        return ImageSet(labels, files=files, size=cfg.image_size, workers=worker_count(cfg.num_workers))


def label_tensor(labels: np.ndarray) -> torch.Tensor:
    """Class indices as int64, multi-hot rows as float32 (the loss's target type)."""
    return torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)


def scan_folder(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class folders sorted as torchvision's ImageFolder does, and their image files."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FinetuneError(f"{folder} holds no class folders; put images in {folder}/<class>/")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise FinetuneError(f"class folder {folder / name} holds no images; add images or remove it")
        files += found
        labels += [index] * len(found)
    return classes, files, np.array(labels)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, None if it is no image PIL can open."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def worker_count(configured: int | str) -> int:
    """`data.num_workers` as a count, `auto` being one per core: decoding threads for data held
    in memory, DataLoader worker processes for streamed data (0: none, the main process loads)."""
    return (os.cpu_count() or 1) if configured == "auto" else int(configured)


def _pool(workers: int | str) -> ThreadPoolExecutor:
    """Decoding threads; with no workers one thread, so that files decode one at a time."""
    return ThreadPoolExecutor(max(1, worker_count(workers)))


def decode_images(found: ImageFiles, cfg: DataConfig) -> ImageSet:
    """Decode every file once, straight into one preallocated uint8 tensor.

    Images that all share one size no larger than `data.image_size` are kept at it (CIFAR
    stays 32 px in memory); otherwise each is decoded to `image_size` as `decode_file` does
    for predict, so memory stays at the size the budget was checked against. Files
    that cannot be decoded are skipped with one warning.
    """
    size = cfg.image_size
    height, width = found.storage_size(size)
    images = torch.empty(len(found.files), 3, height, width, dtype=torch.uint8)
    odd: dict[int, torch.Tensor] = {}  # images of another size than the sample's, already at `size`

    def decode_into(i: int) -> bool:
        array = read_rgb(found.files[i], bound=size)
        if array is None:
            return False
        image = channels_first(array) if array.shape[:2] == (height, width) else fit(array, size)
        if image.shape[1:] == (height, width):
            images[i] = image
        else:
            odd[i] = image
        return True

    with _pool(cfg.num_workers) as pool:
        ok = torch.tensor(list(pool.map(decode_into, range(len(found.files)))), dtype=torch.bool)
    _warn_skipped([f for f, good in zip(found.files, ok.tolist(), strict=True) if not good])
    if odd:
        images = _resize_all(images, odd, ok, size)
    labels = label_tensor(found.labels)
    return ImageSet(labels, images) if ok.all() else ImageSet(labels[ok], images[ok])


def _resize_all(images: torch.Tensor, odd: dict[int, torch.Tensor], ok: torch.Tensor, size: int) -> torch.Tensor:
    """Odd sizes the header sample missed: every image at `size` x `size` after all, as
    `decode_file` would have made it (those kept at their own size were no larger than `size`,
    so draft decoding did not touch them)."""
    out = torch.zeros(len(images), 3, size, size, dtype=torch.uint8)
    for i in ok.nonzero().flatten().tolist():
        out[i] = odd[i] if i in odd else fit(images[i].permute(1, 2, 0).numpy(), size)
    return out


def _warn_skipped(bad: list[Path]) -> None:
    if bad:
        shown = ", ".join(map(str, bad[:3])) + (" ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): {shown}", stacklevel=3)
