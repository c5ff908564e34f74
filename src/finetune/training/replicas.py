"""Every collective the training loop makes, in one object; for one process each is a no-op.

Tensors given to collectives live on the training device: NCCL serves only CUDA tensors, and
gloo serves CPU ones, so the same code is right on both. The stop vote runs every
`VOTE_EVERY` steps and at an epoch's last step, the same steps on every rank, so all ranks
stop at the same step without a host sync per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.runtime import distributed
from finetune.runtime.distributed import Ranks

VOTE_EVERY = 10


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

    def check_same_weights(self, model: nn.Module) -> float:
        """A checksum of the weights, checked equal on every rank (DDP keeps replicas identical)."""
        checksum = sum(p.detach().float().sum().item() for p in model.parameters())  # no float64 on the device
        sums = self.gather(checksum)
        if len(set(sums)) > 1:
            raise RuntimeError(f"weights differ between ranks: checksums {sums}")
        return checksum
