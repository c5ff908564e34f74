"""Several processes under torchrun: the process group, each rank's shard of an epoch, and
objects sent between ranks (a run dir's name, rank 0's metrics). The training loop's
collectives are in training/replicas.py.

Without torchrun there is one process and every function here is a no-op.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("FINETUNE_COLLECTIVE_TIMEOUT", "300")))


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1


SINGLE = Ranks()  # one process: what every function here assumes without torchrun


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def init(device_type: str) -> Ranks:
    """Join torchrun's process group: nccl on CUDA (one GPU per local rank), gloo on CPU.

    Ranks other than 0 print nothing to stdout from here on; errors still reach stderr.
    """
    if not under_torchrun():
        return SINGLE
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend, timeout=TIMEOUT)
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return ranks


def shard(order: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's part of an epoch's order, as DistributedSampler deals it: the order padded
    with its own first indices to a multiple of the world size, then every world-th position.
    Rank r's j-th batch is then positions j*B*W + r, +W, ... so the ranks' batches together are
    the single-process run's batch of B*W."""
    if not ranks.many:
        return order
    total = math.ceil(len(order) / ranks.world) * ranks.world
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[ranks.rank :: ranks.world]


def shard_size(n: int, ranks: Ranks) -> int:
    return math.ceil(n / ranks.world)


def from_main(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's object on every rank: decisions (best epoch, early stop) are made on one set of numbers."""
    if not ranks.many:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not ranks.many:
        return [obj]
    objects = [None] * ranks.world
    dist.all_gather_object(objects, obj)
    return objects


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
