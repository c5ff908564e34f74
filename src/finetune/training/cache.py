"""The cache provider: which cut a stage trains on, and the activations entering it.

The decision is the one `plan` prints (features.CachePlanner, once per stage); each epoch
computes only the (image, flip) pairs it draws that the cache lacks. The head-input cache is
also kept on disk (rank 0), keyed by everything that determines it, for later runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from finetune.config.schema import Config
from finetune.data.batching import BatchTransform
from finetune.data.imageset import ImageSet
from finetune.model.build import BuiltModel
from finetune.runtime.distributed import Ranks
from finetune.runtime.resolve import Runtime
from finetune.training.features import (
    CacheDecision,
    CachePlanner,
    CutModel,
    FeatureCache,
    FeatureStore,
    cache_key,
    empty_cache,
    extract,
    needed_variants,
)


class CacheProvider:
    def __init__(
        self,
        cfg: Config,
        planner: CachePlanner,
        built: BuiltModel,
        sets: tuple[ImageSet, ImageSet],
        transform: BatchTransform,
        runtime: Runtime,
        store: FeatureStore,
        ranks: Ranks,
        guard: Callable[[Iterable], Iterator],
    ):
        self.cfg, self.planner, self.built, self.transform = cfg, planner, built, transform
        self.train_set, self.val_set = sets
        self.runtime, self.store, self.ranks, self.guard = runtime, store, ranks, guard
        self.cache: FeatureCache | None = None
        self.disk_key = ""

    @property
    def decision(self) -> CacheDecision | None:
        return self.planner.current

    def cut_for(self, epoch: int) -> CutModel | None:
        """The cut whose input is cached for this epoch, with the activations this epoch draws."""
        cut = self.planner.decide(epoch).cut
        if cut is None:
            self.cache = None
            return None
        on_disk = cut.cut == self.built.head_name and self.ranks.main  # below the head: too big to keep
        if self.cache is None or self.cache.cut != cut.cut:
            self.disk_key = self.key() if on_disk else ""
            self.cache = self.store.load(self.disk_key, self.runtime.device) if on_disk else None
            if self.cache is None:
                val_batches = math.ceil(len(self.val_set) / self.cfg.data.batch_size)
                val = self._activations(cut, self.val_set.in_order(self.cfg.data.batch_size), val_batches, False)
                self.cache = empty_cache(cut.cut, len(self.train_set), val)
        if self._fill(cut, epoch) and on_disk:
            self.store.save(self.disk_key, self.cache)
        return cut

    def _fill(self, cut: CutModel, epoch: int) -> bool:
        """Compute the pairs this epoch draws that the cache lacks, so a stage's first epoch
        costs no more than the full forward."""
        bs, data = self.cfg.data.batch_size, self.cfg.data
        needed = needed_variants(len(self.train_set), self.cfg.seed, [epoch], data.hflip, self.ranks)

        def compute(index: torch.Tensor, flip: bool) -> torch.Tensor:
            batches = index.split(bs)
            return self._activations(cut, self.train_set.batches(batches), len(batches), flip)

        return self.cache.fill(needed, compute)

    def key(self) -> str:
        """The head-input cache's disk key: weights, pixels, size, normalization, numerics."""
        b = self.built
        settings = (self.cfg.model.arch, self.transform.size, b.mean, b.std, self.runtime.numerics)
        fingerprints = [self.train_set.fingerprint(), self.val_set.fingerprint()]
        return cache_key(b.model, b.head_name, fingerprints, "|".join(map(str, settings)))

    def _activations(self, cut: CutModel, images: Iterator[torch.Tensor], count: int, flip: bool) -> torch.Tensor:
        """The cut's inputs for `count` uint8 batches, every image flipped or none."""
        batches = (self.transform(x, torch.ones(len(x), dtype=torch.bool) if flip else None) for x in images)
        shown = tqdm(batches, f"{cut.cut} inputs", count, leave=False, disable=None if self.ranks.main else True)
        return extract(cut, self.runtime, self.guard(shown))
