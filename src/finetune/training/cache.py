"""The cache provider: which cut a stage trains on, and the activations entering it.

The decision is the one `plan` prints (features.CachePlanner, once per stage); each epoch
computes only the (image, flip) pairs it draws that the cache lacks. The head-input cache is
also kept on disk (rank 0), keyed by everything that determines it, for later runs, which are
charged what its activations cost the run that computed them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from finetune.config.schema import Config
from finetune.data.batching import BatchTransform, sampling_weights
from finetune.data.imageset import ImageSet
from finetune.model.build import BuiltModel
from finetune.runtime.distributed import Ranks
from finetune.runtime.hardware import synchronize
from finetune.runtime.resolve import Runtime
from finetune.training.features import (
    CacheDecision,
    CachePlanner,
    CutModel,
    FeatureCache,
    FeatureCost,
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
        payer: str,
    ):
        """`payer`: the run, as the ledgers of the caches it computes name it."""
        self.cfg, self.planner, self.built, self.transform = cfg, planner, built, transform
        self.train_set, self.val_set = sets
        self.runtime, self.store, self.ranks, self.guard = runtime, store, ranks, guard
        self.payer = payer
        self.cache: FeatureCache | None = None
        self.disk_key = ""
        self.cost = FeatureCost()  # the last epoch's
        self.drawn = torch.zeros(0)  # (2, N) bool: the pairs this run drew from the cache before this epoch
        self.since = 0  # the first epoch of the cache's stage
        self.weights = sampling_weights(cfg.data.sampler, self.train_set.labels)

    @property
    def decision(self) -> CacheDecision | None:
        return self.planner.current

    def cut_for(self, epoch: int) -> CutModel | None:
        """The cut whose input is cached for this epoch, with the activations this epoch draws;
        `cost` says what they cost."""
        cut = self.planner.decide(epoch).cut
        self.cost = FeatureCost()
        if cut is None:
            self.cache = None
            return None
        on_disk = cut.cut == self.built.head_name and self.ranks.main  # below the head: too big to keep
        computed = False
        if self.cache is None or self.cache.cut != cut.cut:
            self.disk_key = self.key() if on_disk else ""
            self.cache = self.store.load(self.disk_key, self.runtime.device) if on_disk else None
            if computed := self.cache is None:
                self.cache = self._empty(cut)
            self.since = self.planner.current.epochs.start
            self.drawn = self._needed(range(self.since, epoch))
        needed = self._needed([epoch])
        if (self._fill(cut, needed) > 0 or computed) and on_disk:
            self.store.save(self.disk_key, self.cache)
        self.cost = self._charged(needed, epoch)
        return cut

    def _empty(self, cut: CutModel) -> FeatureCache:
        """A new cache holding the validation activations, computed now by this run."""
        started = time.perf_counter()
        batches = math.ceil(len(self.val_set) / self.cfg.data.batch_size)
        val = self._activations(cut, self.val_set.in_order(self.cfg.data.batch_size), batches, False)
        return empty_cache(cut.cut, len(self.train_set), val, self.payer, time.perf_counter() - started)

    def _needed(self, epochs: Iterable[int]) -> torch.Tensor:
        cfg = self.cfg
        return needed_variants(len(self.train_set), cfg.seed, epochs, cfg.data.hflip, self.ranks, self.weights)

    def _fill(self, cut: CutModel, needed: torch.Tensor) -> float:
        """Compute the pairs this epoch draws that the cache lacks, so a stage's first epoch
        costs no more than the full forward; the seconds that took."""
        bs = self.cfg.data.batch_size

        def compute(index: torch.Tensor, flip: bool) -> torch.Tensor:
            batches = index.split(bs)
            return self._activations(cut, self.train_set.batches(batches), len(batches), flip)

        return self.cache.fill(needed, compute, self.payer)

    def _charged(self, needed: torch.Tensor, epoch: int) -> FeatureCost:
        """What the activations this epoch uses for the first time in this run cost this run and
        the others. A function of the epochs and the ledger alone, so a resumed run is charged as
        the uninterrupted one was."""
        first_use = needed & ~self.drawn
        self.drawn |= needed
        rows = self.cache.slot[first_use.to(self.cache.slot.device)].cpu()
        return self.cache.ledger.charged(rows, self.payer, val=epoch == self.since)

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
        activations = extract(cut, self.runtime, self.guard(shown))
        synchronize(self.runtime.device)  # their cost is timed
        return activations
