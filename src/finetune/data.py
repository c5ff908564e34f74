"""Datasets decoded once into uint8 tensors, seeded subsets, class counts, batched transforms.

Images are held as one (N, 3, H, W) uint8 tensor so resizing, flipping and normalizing
happen on whole batches on the training device instead of per sample through PIL.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config import DataConfig
from finetune.errors import FinetuneError

SIZE_SAMPLE = 64  # image headers read to choose how decoded images are stored
DIGITS_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageSet:
    """Labels and their images: decoded once into memory as (N, 3, H, W) uint8, or, for a
    dataset over `data.memory_budget_mb`, image files decoded batch by batch by DataLoader
    workers (each resized to `size` as it is decoded)."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    size: int = 0
    workers: int = 0

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
            for index in index_batches:
                yield self.images[index.to(self.images.device)]
            return
        sampler = [index.tolist() for index in index_batches]
        dataset = _ImageFiles(self.files, self.size)
        # Workers draw nothing random, but a DataLoader seeds them from its generator, by
        # default the global one that dropout draws from: a private one keeps resume exact.
        private = torch.Generator().manual_seed(0)
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=torch.stack, generator=private
        )
        yield from loader

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


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        array = read_rgb(self.files[i], bound=self.size)
        if array is None:  # passed the header check at scan time, failed to decode now
            warnings.warn(f"{self.files[i]} could not be decoded; a black image stands in", stacklevel=1)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        return torch.from_numpy(resized(array, self.size, self.size)).permute(2, 0, 1)


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(cfg: DataConfig) -> DataSplits:
    """Build the train and val sets the config asks for, subsets and splits drawn by
    `data.split_seed` (not the run's `seed`: runs over seeds are scored on the same images)."""
    loader = {"cifar10": _load_cifar10, "imagefolder": _load_imagefolder, "digits": _load_digits}
    return loader[cfg.dataset](cfg, cfg.split_seed)


def choose_subset(labels: np.ndarray, size: int | None, how: str, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset; `stratified` keeps class proportions."""
    n = len(labels)
    if size is None or size >= n:
        return np.arange(n)
    if how == "first":
        return np.arange(size)
    order = np.random.default_rng(seed).permutation(n)
    if how == "stratified":
        shuffled = labels[order]
        rank = pd.Series(shuffled).groupby(shuffled).cumcount().to_numpy()
        counts = np.bincount(labels)[shuffled]
        order = order[np.argsort((rank + 0.5) / counts, kind="stable")]
    return np.sort(order[:size])


def resolve_classes(requested: list[str | int] | None, class_names: list[str]) -> list[int]:
    """Indices of the classes named (by name or index) in `data.train_classes`."""
    if requested is None:
        return list(range(len(class_names)))
    return sorted({class_index(item, class_names, "data.train_classes") for item in requested})


def class_index(item: str | int, class_names: list[str], key: str) -> int:
    """The index of a class given by name or index.

    When every class folder is named by a number ("1", "2", "10"), an integer means the
    folder of that name: folders sort as strings, so index 2 would be folder "10".
    """
    numeric = all(name.isdigit() for name in class_names)
    if isinstance(item, int) and numeric:
        item = str(item)
    if isinstance(item, int) and 0 <= item < len(class_names):
        return item
    if isinstance(item, str) and item in class_names:
        return class_names.index(item)
    choices = "folder names" if numeric else f"names or indices 0-{len(class_names) - 1}"
    raise FinetuneError(f"{key}: {item!r} is not a class of this dataset; use {choices} of: {', '.join(class_names)}")


def _train_indices(labels: np.ndarray, cfg: DataConfig, class_names: list[str], seed: int) -> np.ndarray:
    keep = np.flatnonzero(np.isin(labels, resolve_classes(cfg.train_classes, class_names)))
    return keep[choose_subset(labels[keep], cfg.train_size, cfg.subset, seed)]


def _val_indices(labels: np.ndarray, cfg: DataConfig, seed: int) -> np.ndarray:
    return choose_subset(labels, cfg.val_size, cfg.subset, seed + 1)


def _from_hwc(array: np.ndarray, labels: np.ndarray) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(torch.as_tensor(labels, dtype=torch.long), images)


def _load_cifar10(cfg: DataConfig, seed: int) -> DataSplits:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(cfg.root, train=True, download=cfg.download)
        val = CIFAR10(cfg.root, train=False, download=cfg.download)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise FinetuneError(
            f"CIFAR-10 is not in data.root={cfg.root} and could not be downloaded ({reason}); "
            "point data.root at a copy of cifar-10-batches-py, or use data.dataset=imagefolder "
            "with data.root=<dir holding train/ and test/>"
        ) from None
    train_labels, val_labels = np.array(train.targets), np.array(val.targets)
    ti = _train_indices(train_labels, cfg, train.classes, seed)
    vi = _val_indices(val_labels, cfg, seed)
    return DataSplits(
        _from_hwc(train.data[ti], train_labels[ti]), _from_hwc(val.data[vi], val_labels[vi]), train.classes
    )


def _load_digits(cfg: DataConfig, seed: int) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, split 80/20 by seed: real data with no network."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    labels = digits.target
    ti, vi = _digits_indices(labels, cfg, seed)
    return DataSplits(_from_hwc(rgb[ti], labels[ti]), _from_hwc(rgb[vi], labels[vi]), DIGITS_CLASSES)


def _digits_indices(labels: np.ndarray, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train_all, val_all = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels)
    ti = train_all[_train_indices(labels[train_all], cfg, DIGITS_CLASSES, seed)]
    return ti, val_all[_val_indices(labels[val_all], cfg, seed)]


def split_sizes(cfg: DataConfig) -> tuple[list[str], int, int]:
    """(class names, train size, val size) from labels alone, no image decoded: what `plan`
    needs to count steps. Unreadable images, found only when decoding, are not subtracted."""
    seed = cfg.split_seed
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        ti, vi = _digits_indices(load_digits().target, cfg, seed)
        return DIGITS_CLASSES, len(ti), len(vi)
    if cfg.dataset == "cifar10":  # 5,000 training and 1,000 test images per class
        names, train_labels, val_labels = (
            CIFAR10_CLASSES,
            np.repeat(np.arange(10), 5000),
            np.repeat(np.arange(10), 1000),
        )
    else:
        train_dir, val_dir = _imagefolder_dirs(Path(cfg.root))
        names, _, train_labels = scan_folder(train_dir)
        val_labels = scan_folder(val_dir)[2]
    return names, len(_train_indices(train_labels, cfg, names, seed)), len(_val_indices(val_labels, cfg, seed))


def _load_imagefolder(cfg: DataConfig, seed: int) -> DataSplits:
    root = Path(cfg.root)
    _, val_dir = _imagefolder_dirs(root)
    class_names, train_files, train_labels = scan_folder(root / "train")
    val_names, val_files, val_labels = scan_folder(val_dir)
    if val_names != class_names:
        differ = sorted(set(class_names) ^ set(val_names))
        raise FinetuneError(
            f"{root / 'train'} and {val_dir} have different class folders ({', '.join(differ)}); "
            "give both the same classes"
        )
    ti = _train_indices(train_labels, cfg, class_names, seed)
    vi = _val_indices(val_labels, cfg, seed)
    train = ImageFiles([train_files[i] for i in ti], train_labels[ti])
    val = ImageFiles([val_files[i] for i in vi], val_labels[vi])
    if train.estimate_mb(cfg.image_size) + val.estimate_mb(cfg.image_size) <= cfg.memory_budget_mb:
        splits = DataSplits(decode_images(train, cfg), decode_images(val, cfg), class_names)
    else:
        splits = DataSplits(train.streamed(cfg), val.streamed(cfg), class_names)
    _require_all_classes(set(train.labels.tolist()), splits.train, class_names, root / "train")
    return splits


def _imagefolder_dirs(root: Path) -> tuple[Path, Path]:
    """root/train and root/val (or root/test), or one line saying what is missing."""
    if not root.is_dir():
        raise FinetuneError(f"data.root={root} does not exist; point it at a dir holding train/ and val/")
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise FinetuneError(f"data.root={root} must hold train/ and val/ (or test/) folders of class folders")
    return root / "train", val_dir


@dataclass
class ImageFiles:
    files: list[Path]
    labels: np.ndarray

    def storage_size(self, size: int) -> tuple[int, int]:
        """(height, width) to hold every image at in memory: their own size if a sample of
        headers spread over the folder all agree and fit in `size` (CIFAR stays 32 px and
        is resized per batch on the device), else `size` x `size`, resized at decode."""
        step = max(1, len(self.files) // SIZE_SAMPLE)
        sizes = {s for s in map(_header_size, self.files[::step][:SIZE_SAMPLE]) if s is not None}
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
            ok = list(pool.map(_header_size, self.files))
        _warn_skipped([f for f, size in zip(self.files, ok, strict=True) if size is None])
        keep = [i for i, size in enumerate(ok) if size is not None]
        labels = torch.as_tensor(self.labels[keep], dtype=torch.long)
        files = [self.files[i] for i in keep]
        return ImageSet(labels, files=files, size=cfg.image_size, workers=worker_count(cfg.num_workers))


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


def read_rgb(path: Path, bound: int | None = None) -> np.ndarray | None:
    """The image as RGB; with `bound`, a large JPEG is decoded at a reduced scale no smaller
    than `bound` (PIL's draft), so a 2000x1500 photo never sits in memory at full size."""
    try:
        with Image.open(path) as img:
            if bound is not None:
                img.draft("RGB", (bound, bound))
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def worker_count(configured: int) -> int:
    """`data.num_workers`, 0 meaning one per core: decoding threads for data held in memory,
    DataLoader worker processes for streamed data."""
    return configured or os.cpu_count() or 1


def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(worker_count(workers))


def resized(array: np.ndarray, height: int, width: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return np.array(Image.fromarray(array).resize((width, height), Image.BILINEAR))


def decode_images(found: ImageFiles, cfg: DataConfig) -> ImageSet:
    """Decode every file once, straight into one preallocated uint8 tensor.

    Images that all share one size no larger than `data.image_size` are kept at it (CIFAR
    stays 32 px in memory); otherwise each is resized to `image_size` as it is decoded (a
    large JPEG at a reduced scale first), so memory stays at the size the budget was checked
    against. Files that cannot be decoded are skipped with one warning.
    """
    size = cfg.image_size
    height, width = found.storage_size(size)
    images = torch.empty(len(found.files), 3, height, width, dtype=torch.uint8)
    odd: dict[int, np.ndarray] = {}  # images of another size than the sample's, already at `size`

    def decode_into(i: int) -> bool:
        array = read_rgb(found.files[i], bound=size)
        if array is None:
            return False
        if (height, width) == (size, size):
            array = resized(array, size, size)
        if array.shape[:2] == (height, width):
            images[i] = torch.from_numpy(array).permute(2, 0, 1)
        else:
            odd[i] = resized(array, size, size)
        return True

    with _pool(cfg.num_workers) as pool:
        ok = torch.tensor(list(pool.map(decode_into, range(len(found.files)))), dtype=torch.bool)
    _warn_skipped([f for f, good in zip(found.files, ok.tolist(), strict=True) if not good])
    if odd:
        images = _resize_all(images, odd, ok, cfg.image_size)
    labels = torch.as_tensor(found.labels, dtype=torch.long)
    return ImageSet(labels, images) if ok.all() else ImageSet(labels[ok], images[ok])


def _resize_all(images: torch.Tensor, odd: dict[int, np.ndarray], ok: torch.Tensor, size: int) -> torch.Tensor:
    """Odd sizes the header sample missed: every image at `size` x `size` after all."""
    out = torch.zeros(len(images), 3, size, size, dtype=torch.uint8)
    for i in ok.nonzero().flatten().tolist():
        array = odd[i] if i in odd else resized(images[i].permute(1, 2, 0).numpy(), size, size)
        out[i] = torch.from_numpy(array).permute(2, 0, 1)
    return out


def _warn_skipped(bad: list[Path]) -> None:
    if bad:
        shown = ", ".join(map(str, bad[:3])) + (" ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): {shown}", stacklevel=3)


def _require_all_classes(wanted: set[int], train: ImageSet, class_names: list[str], folder: Path) -> None:
    """A class chosen for training that lost every image to unreadable files is an error."""
    lost = sorted(wanted - set(train.labels.tolist()))
    if lost:
        names = ", ".join(class_names[i] for i in lost)
        raise FinetuneError(f"no readable images left for class(es) {names} in {folder}; replace the corrupt files")


def class_counts(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=num_classes)


def epoch_plan(n: int, seed: int, epoch: int, hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle order and per-sample flips for one epoch, a pure function of (seed, epoch).

    Deriving them from the epoch rather than a running generator is what lets a resumed run
    replay or continue an epoch exactly, and lets cached and uncached paths draw the same flips.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return order, flips


def split_batches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """An epoch's batches; a last batch of one sample joins the one before it, since
    BatchNorm cannot train on a single sample (cached and uncached paths split alike)."""
    batches = order.split(batch_size)
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches = (*batches[:-2], torch.cat(batches[-2:]))
    return batches


class BatchTransform:
    """uint8 batch -> resized, flipped, normalized float batch, all on the training device."""

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        layout: torch.memory_format = torch.channels_last,
    ):
        self.size, self.layout = size, layout
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
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
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.layout)
