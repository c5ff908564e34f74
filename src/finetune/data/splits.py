"""Seeded, stratified ways to divide labelled images: a validation share, and k folds.

Both are drawn by `data.split_seed`, never the run's `seed`, so runs over seeds are scored on
the same images and the folds of a cross-validation partition one fixed pool.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from finetune.errors import FinetuneError


@dataclass
class Pool:
    """Labelled images not yet decoded: decoded pixels (N, H, W, 3), file paths, or bare indices."""

    items: np.ndarray
    labels: np.ndarray

    @classmethod
    def of_labels(cls, labels: np.ndarray) -> Pool:
        """A pool to count with: its items are positions."""
        return cls(np.arange(len(labels)), labels)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Pool:
        return Pool(self.items[index], self.labels[index])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices with `fraction` of each class, rounded, in val: at least one
    image of a class that has two, never a class's only image. Multi-hot labels are split by
    iterative stratification (iterstrat), which keeps each label's share close to `fraction`."""
    if labels.ndim == 2:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        train, val = next(splitter.split(np.zeros(len(labels)), labels))
        return np.sort(train), np.sort(val)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, round(len(members) * fraction)), len(members) - 1)
        val.append(rng.permutation(members)[:count])
    val_index = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), val_index), val_index


def fold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices: fold `fold` of `folds` stratified folds validates, the rest
    train (scikit-learn's StratifiedKFold, shuffled by `seed`)."""
    if labels.ndim == 2:
        return _multilabel_fold(labels, folds, fold, seed)
    from sklearn.model_selection import StratifiedKFold

    largest = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    if largest < folds:
        raise FinetuneError(
            f"config: data.folds = {folds} is more than the {largest} training images of the largest class; "
            "use fewer folds"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return next(itertools.islice(splitter.split(np.zeros(len(labels)), labels), fold, None))


def _multilabel_fold(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Folds of multi-hot labels by iterative stratification (Sechidis et al., 2011; iterstrat)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if len(labels) < folds:
        raise FinetuneError(f"config: data.folds = {folds} is more than the {len(labels)} training images; use fewer")
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train, val = next(itertools.islice(splitter.split(np.zeros(len(labels)), labels), fold, None))
    return np.sort(train), np.sort(val)


def strata(labels: np.ndarray) -> np.ndarray:
    """A class per image to stratify subsets by: its label, or for multi-hot rows its rarest
    label (images without one form a stratum of their own)."""
    if labels.ndim == 1:
        return labels
    counts = labels.sum(0)
    rarity = np.where(labels > 0, counts, np.inf)
    return np.where(np.isfinite(rarity.min(1)), rarity.argmin(1), labels.shape[1]) if len(labels) else labels[:, 0]


def fold_pools(pool: Pool, folds: int, fold: int, seed: int) -> tuple[Pool, Pool]:
    """The training pool cut into the fold's training and validation images."""
    train, val = fold_split(pool.labels, folds, fold, seed)
    return pool.take(train), pool.take(val)
