"""The config's data: sources (CIFAR-10, an image folder, a CSV of files, scikit-learn's
digits), seeded subsets, splits and folds, class names and counts. `load_data` turns a
DataConfig into DataSplits."""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from finetune.config.schema import DataConfig
from finetune.data.csv_source import read_csv_source
from finetune.data.imageset import ImageFiles, ImageSet, decode_images, scan_folder
from finetune.data.splits import Pool, fold_pools, strata
from finetune.errors import FinetuneError
from finetune.files import removed_on_failure

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

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


def load_data(cfg: DataConfig, multilabel: bool = False) -> DataSplits:
    """Build the train and val sets the config asks for, subsets and splits drawn by
    `data.split_seed` (not the run's `seed`: runs over seeds are scored on the same images).
    `multilabel` (a CSV only): labels are multi-hot float rows."""
    if cfg.dataset == "csv":
        return _load_csv(cfg, multilabel)
    loader = {"cifar10": _load_cifar10, "imagefolder": _load_imagefolder, "digits": _load_digits}
    return loader[cfg.dataset](cfg)


def select(train: Pool, val: Pool, cfg: DataConfig, class_names: list[str]) -> tuple[Pool, Pool]:
    """The images that train and those that validate. With `data.folds` the validation images
    are fold `data.fold` of the training pool (the source's own validation set is left out);
    then `train_size`, `train_classes` and `val_size` subset each side as always."""
    seed = cfg.split_seed
    if cfg.folds is not None:
        train, val = fold_pools(train, cfg.folds, cfg.fold, seed)
    return train.take(_train_indices(train.labels, cfg, class_names, seed)), val.take(
        _val_indices(val.labels, cfg, seed)
    )


def choose_subset(labels: np.ndarray, size: int | None, how: str, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset; `stratified` keeps class proportions."""
    n, labels = len(labels), strata(labels)
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
    if cfg.train_classes is None:
        keep = np.arange(len(labels))
    else:
        keep = np.flatnonzero(np.isin(labels, resolve_classes(cfg.train_classes, class_names)))
    return keep[choose_subset(labels[keep], cfg.train_size, cfg.subset, seed)]


def _val_indices(labels: np.ndarray, cfg: DataConfig, seed: int) -> np.ndarray:
    return choose_subset(labels, cfg.val_size, cfg.subset, seed + 1)


def _from_hwc(pool: Pool) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(pool.items)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(torch.as_tensor(pool.labels, dtype=torch.long), images)


def _load_cifar10(cfg: DataConfig) -> DataSplits:
    train, val = _cifar10_sets(cfg) if cfg.download else _local_cifar10_sets(cfg)
    pools = Pool(train.data, np.array(train.targets)), Pool(val.data, np.array(val.targets))
    train_pool, val_pool = select(*pools, cfg, train.classes)
    return DataSplits(_from_hwc(train_pool), _from_hwc(val_pool), train.classes)


def _cifar10_sets(cfg: DataConfig) -> tuple[CIFAR10, CIFAR10]:
    """torchvision's CIFAR-10, downloaded into data.root when not there; a failed download
    removes what it wrote (a partial archive, a half-extracted folder, the folders made)."""
    from torchvision.datasets import CIFAR10

    try:
        with removed_on_failure(Path(cfg.root), (CIFAR10.filename, CIFAR10.base_folder)):
            return CIFAR10(cfg.root, train=True, download=True), CIFAR10(cfg.root, train=False, download=True)
    except (OSError, RuntimeError, http.client.HTTPException) as exc:
        raise FinetuneError(
            f"CIFAR-10 download from {CIFAR10.url} failed ({_first_line(exc)}); nothing was left in "
            f"data.root={cfg.root}. Offline, put a copy of cifar-10-batches-py there and set data.download: false, "
            "or use data.dataset: imagefolder with data.root at a local copy holding train/ and val/"
        ) from None


def _local_cifar10_sets(cfg: DataConfig) -> tuple[CIFAR10, CIFAR10]:
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(cfg.root, train=True), CIFAR10(cfg.root, train=False)
    except (OSError, RuntimeError):
        raise FinetuneError(
            f"CIFAR-10 is not in data.root={cfg.root} and data.download is false; "
            "point data.root at a copy of cifar-10-batches-py, or use data.dataset: imagefolder "
            "with data.root at a local copy holding train/ and val/"
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


def _load_digits(cfg: DataConfig) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, split 80/20 by seed: real data with no network."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    train_pool, val_pool = select(*_digits_pools(Pool(rgb, digits.target), cfg.split_seed), cfg, DIGITS_CLASSES)
    return DataSplits(_from_hwc(train_pool), _from_hwc(val_pool), DIGITS_CLASSES)


def _digits_pools(pool: Pool, seed: int) -> tuple[Pool, Pool]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(pool))
    train_all, val_all = train_test_split(index, test_size=0.2, random_state=seed, stratify=pool.labels)
    return pool.take(train_all), pool.take(val_all)


def split_sizes(cfg: DataConfig, multilabel: bool = False) -> tuple[list[str], int, int]:
    """(class names, train size, val size) from labels alone, no image decoded: what `plan`
    needs to count steps. Unreadable images, found only when decoding, are not subtracted."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        names, pools = DIGITS_CLASSES, _digits_pools(Pool.of_labels(load_digits().target), cfg.split_seed)
    elif cfg.dataset == "cifar10":  # 5,000 training and 1,000 test images per class
        names = CIFAR10_CLASSES
        pools = Pool.of_labels(np.repeat(np.arange(10), 5000)), Pool.of_labels(np.repeat(np.arange(10), 1000))
    elif cfg.dataset == "csv":
        source = read_csv_source(cfg, multilabel)
        names, pools = source.class_names, (source.train, source.val)
    else:
        names, pools = _imagefolder_pools(Path(cfg.root), cfg.folds)
    train, val = select(*pools, cfg, names)
    return names, len(train), len(val)


def _load_imagefolder(cfg: DataConfig) -> DataSplits:
    root = Path(cfg.root)
    class_names, pools = _imagefolder_pools(root, cfg.folds)
    return _from_files(select(*pools, cfg, class_names), class_names, cfg, root / "train")


def _load_csv(cfg: DataConfig, multilabel: bool) -> DataSplits:
    source = read_csv_source(cfg, multilabel)
    pools = select(source.train, source.val, cfg, source.class_names)
    return _from_files(pools, source.class_names, cfg, Path(cfg.csv))


def _imagefolder_pools(root: Path, folds: int | None) -> tuple[list[str], tuple[Pool, Pool]]:
    """Class names, and the files of train/ and val/ (or test/) as pools. With folds the
    validation images come out of train/, so val/ is neither needed nor read."""
    val_dir = _imagefolder_dirs(root, need_val=folds is None)
    class_names, train_files, train_labels = scan_folder(root / "train")
    train = Pool(np.array(train_files, dtype=object), train_labels)
    if val_dir is None:
        return class_names, (train, train)
    val_names, val_files, val_labels = scan_folder(val_dir)
    if val_names != class_names:
        differ = sorted(set(class_names) ^ set(val_names))
        raise FinetuneError(
            f"{root / 'train'} and {val_dir} have different class folders ({', '.join(differ)}); "
            "give both the same classes"
        )
    return class_names, (train, Pool(np.array(val_files, dtype=object), val_labels))


def _from_files(pools: tuple[Pool, Pool], class_names: list[str], cfg: DataConfig, source: Path) -> DataSplits:
    """Image files decoded into memory, or streamed when they would pass `data.memory_budget_mb`."""
    train, val = (ImageFiles(list(pool.items), pool.labels) for pool in pools)
    if train.estimate_mb(cfg.image_size) + val.estimate_mb(cfg.image_size) <= cfg.memory_budget_mb:
        splits = DataSplits(decode_images(train, cfg), decode_images(val, cfg), class_names)
    else:
        splits = DataSplits(train.streamed(cfg), val.streamed(cfg), class_names)
    _require_all_classes(present(train.labels), splits.train, class_names, source)
    return splits


def _imagefolder_dirs(root: Path, need_val: bool) -> Path | None:
    """root/val (or root/test) when it is needed, once root/train is known to be there; or one
    line saying what is missing."""
    if not root.is_dir():
        raise FinetuneError(f"data.root={root} does not exist; point it at a dir holding train/ and val/")
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or (need_val and val_dir is None):
        needed = "train/ and val/ (or test/) folders" if need_val else "a train/ folder"
        raise FinetuneError(f"data.root={root} must hold {needed} of class folders")
    return val_dir if need_val else None


def _require_all_classes(wanted: set[int], train: ImageSet, class_names: list[str], folder: Path) -> None:
    """A class chosen for training that lost every image to unreadable files is an error."""
    lost = sorted(wanted - present(train.labels.numpy()))
    if lost:
        names = ", ".join(class_names[i] for i in lost)
        raise FinetuneError(f"no readable images left for class(es) {names} in {folder}; replace the corrupt files")


def present(labels: np.ndarray) -> set[int]:
    """The classes at least one image carries."""
    return set(np.flatnonzero(labels.sum(0) > 0).tolist()) if labels.ndim == 2 else set(labels.tolist())


def class_counts(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Images per class (multi-hot: per label)."""
    if labels.ndim == 2:
        return labels.sum(0).round().long().numpy()
    return np.bincount(labels.numpy(), minlength=num_classes)
