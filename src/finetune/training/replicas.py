"""Every collective the training loop makes, in one object; for one process each is a no-op.

Tensors given to collectives live on the training device: NCCL serves only CUDA tensors, and
gloo serves CPU ones, so the same code is right on both. The stop vote runs every
`VOTE_EVERY` steps and at an epoch's last step, the same steps on every rank, so all ranks
stop at the same step without a host sync per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.runtime import distributed
from finetune.runtime.distributed import Ranks
from finetune.training.ema import WeightAverage

VOTE_EVERY = 10
INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes -> an integer type


class Replicas:
    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks, self.device = ranks, device
        self.wrapped: tuple[Any, nn.Module] | None = None

    @property
    def many(self) -> bool:
        return self.ranks.many

    @property
    def main(self) -> bool:
        return self.ranks.main

    def wrap(self, module: nn.Module, key: Any) -> nn.Module:
        """`module` under DDP, wrapped anew whenever `key` (stage, cut) changes: DDP's reducer
        registers the parameters that require grad when it is built, so one built before an
        unfreeze would never all-reduce the newly trainable ones (Lightning #20340)."""
        if not self.many:
            return module
        if self.wrapped is None or self.wrapped[0] != key:
            devices = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = (key, DistributedDataParallel(module, device_ids=devices))
        return self.wrapped[1]

    def stop_after(self, step: int, last: bool, requested: bool) -> bool:
        """Whether every rank stops after 0-based `step`; one process stops at once."""
        if not self.many:
            return requested
        if (step + 1) % VOTE_EVERY and not last:
            return False
        return self.any(requested)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sums over ranks of a tensor on the device."""
        if self.many:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def from_main(self, obj: Any) -> Any:
        return distributed.from_main(obj, self.ranks)

    def gather(self, obj: Any) -> list[Any]:
        return distributed.gather(obj, self.ranks)

    def share_buffers(self, buffers: list[torch.Tensor]) -> None:
        """Rank 0's values in every rank's `buffers`, one broadcast per dtype. DDP sends rank 0's
        buffers (BatchNorm statistics) at each forward, but each rank's last forward of an epoch
        updates its own after that, so the replicas would end each epoch apart."""
        if not self.many:
            return
        for dtype in dict.fromkeys(b.dtype for b in buffers):  # in the same order on every rank
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            for buffer, value in zip(group, flat.split([b.numel() for b in group]), strict=True):
                buffer.copy_(value.view_as(buffer))

    def check_identical(self, tensors: dict[str, torch.Tensor]) -> int:
        """How many tensors were compared; raise unless each is bit-identical on every rank: DDP keeps the replicas
        identical, and one that drifted (a buffer, the average) would save or score other weights.
        Only checksums travel, on the training device, so NCCL and gloo both serve them."""
        mine = checksums(tensors.values()).to(self.device)
        every = [torch.empty_like(mine) for _ in range(self.ranks.world)]
        dist.all_gather(every, mine)
        for rank, theirs in enumerate(every):
            differ = torch.nonzero((theirs != every[0]).any(dim=1))
            if len(differ):
                name = list(tensors)[int(differ[0])]
                raise RuntimeError(f"weights differ between ranks: {name} on rank {rank} is not rank 0's")
        return len(tensors)


def buffers(model: nn.Module, ema: WeightAverage | None) -> list[torch.Tensor]:
    """The model's buffers and the weight average's: what DDP does not keep equal across ranks."""
    average = [ema.average[key] for key in ema.buffers] if ema is not None else []
    return [*model.buffers(), *average]


def replicated(model: nn.Module, ema: WeightAverage | None) -> dict[str, torch.Tensor]:
    """Every tensor that must be bit-identical on every rank: parameters, buffers, the average's."""
    tensors = model.state_dict()
    if ema is not None:
        tensors.update({f"ema.{key}": value for key, value in ema.average.items()})
    return tensors


def checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per tensor, the plain and the position-weighted int64 sums of its elements read as
    integers of their width: exact, where a float sum rounds and can cancel. The sums wrap
    modulo 2^64 alike in any order, and one changed element changes the plain one."""
    rows = []
    for tensor in tensors:
        bits = tensor.detach().reshape(-1).view(INTS[tensor.element_size()]).long()
        weights = torch.arange(1, len(bits) + 1, device=bits.device)
        rows.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(rows)
