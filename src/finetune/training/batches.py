"""The epoch's batch source: (epoch, steps done, cut) -> this rank's batches as model inputs.

An epoch's order (shuffled, or drawn class-balanced) and flips are a function of (seed, epoch)
(data.epoch_plan), dealt to the ranks like DistributedSampler (distributed.shard), so a
resumed epoch continues at its step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from finetune.config.schema import Config
from finetune.data.augment import Augment
from finetune.data.batching import BatchTransform, epoch_plan, sampling_weights, split_batches
from finetune.data.imageset import ImageSet
from finetune.runtime.distributed import Ranks, shard, shard_size
from finetune.training.features import CutModel, FeatureCache


def steps_per_epoch(n: int, batch_size: int, world: int = 1, accumulate: int = 1) -> int:
    """Optimizer steps of one epoch on each rank, of `accumulate` batches each (the last may
    have fewer): the one count the schedule, plan and the loop use."""
    return math.ceil(len(split_batches(torch.arange(shard_size(n, Ranks(world=world))), batch_size)) / accumulate)


@dataclass
class EpochBatches:
    index: tuple[torch.Tensor, ...]  # this rank's batches of the epoch's order, on the device
    inputs: Iterator[torch.Tensor]  # model inputs of the steps from `first` on
    first: int  # steps done before (a resumed epoch)


class BatchSource:
    def __init__(
        self,
        cfg: Config,
        train_set: ImageSet,
        transform: BatchTransform,
        augment: Augment | None,
        ranks: Ranks,
        device: torch.device,
    ):
        self.cfg, self.train_set, self.transform, self.augment = cfg, train_set, transform, augment
        self.ranks, self.device = ranks, device
        self.weights = sampling_weights(cfg.data.sampler, train_set.labels)

    def epoch(self, epoch: int, done: int, cut: CutModel | None, cache: FeatureCache | None) -> EpochBatches:
        """The epoch's batches, and inputs from step `done` on: cached activations above the
        cut, else uint8 images through the batch transform (and augmentation)."""
        order, flips = epoch_plan(len(self.train_set), self.cfg.seed, epoch, self.cfg.data.hflip, self.weights)
        order, flips = shard(order, self.ranks).to(self.device), flips.to(self.device)
        index = split_batches(order, self.cfg.data.batch_size)  # on the device: no copies per step
        todo = index[done:]
        if cut is not None:
            inputs = (cache.train_inputs(i, flips[i]) for i in todo)
        else:
            hflip, augment = self.cfg.data.hflip, self.augment
            inputs = (
                self.transform(x, flips[i] if hflip else None, augment and partial(augment.images, epoch=epoch, step=s))
                for s, (i, x) in enumerate(zip(todo, self.train_set.batches(todo), strict=True), start=done)
            )
        return EpochBatches(index, inputs, done)
