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
    image of a class that has two, never a class's only image."""
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
    from sklearn.model_selection import StratifiedKFold

    largest = int(np.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    if largest < folds:
        raise FinetuneError(
            f"config: data.folds = {folds} is more than the {largest} training images of the largest class; "
            "use fewer folds"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return next(itertools.islice(splitter.split(np.zeros(len(labels)), labels), fold, None))


def fold_pools(pool: Pool, folds: int, fold: int, seed: int) -> tuple[Pool, Pool]:
    """The training pool cut into the fold's training and validation images."""
    train, val = fold_split(pool.labels, folds, fold, seed)
    return pool.take(train), pool.take(val)
