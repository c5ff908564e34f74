"""The config's data: sources (CIFAR-10, an image folder, scikit-learn's digits), seeded
subsets and splits, class names and counts. `load_data` turns a DataConfig into DataSplits."""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from finetune.config import DataConfig
from finetune.errors import FinetuneError
from finetune.imageset import ImageFiles, ImageSet, decode_images, scan_folder

DIGITS_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


def _require_all_classes(wanted: set[int], train: ImageSet, class_names: list[str], folder: Path) -> None:
    """A class chosen for training that lost every image to unreadable files is an error."""
    lost = sorted(wanted - set(train.labels.tolist()))
    if lost:
        names = ", ".join(class_names[i] for i in lost)
        raise FinetuneError(f"no readable images left for class(es) {names} in {folder}; replace the corrupt files")


def class_counts(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=num_classes)
