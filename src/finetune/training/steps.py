"""The step runner: an epoch's batches -> optimizer steps, with every step's loss and hits.

With `train.accumulate_steps` k, the gradients of k batches make one optimizer step; the
schedule counts optimizer steps, and `progress.step` counts batches. The host syncs (progress
bar, finiteness check, TensorBoard) happen every `CHECK_EVERY` optimizer steps, not per step,
so a GPU is never waited on per batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from finetune.data.augment import Augment
from finetune.errors import FinetuneError
from finetune.model.freezing import group_lrs, set_lrs
from finetune.model.schedule import Schedule
from finetune.runs.writer import RunWriter
from finetune.runtime.resolve import Runtime
from finetune.training.batches import EpochBatches
from finetune.training.ema import WeightAverage
from finetune.training.losses import correct
from finetune.training.replicas import Replicas
from finetune.training.state import Progress
from finetune.training.stop import StopSignal

CHECK_EVERY = 10  # steps between host syncs


@dataclass
class StepStats:
    """One epoch's steps on this rank: losses and correct counts per step, on the device."""

    losses: torch.Tensor
    corrects: torch.Tensor
    sizes: torch.Tensor
    done: int

    @classmethod
    def start(cls, batches: EpochBatches, progress: Progress, device: torch.device) -> StepStats:
        """Room for every step; those a resumed epoch did already come from its progress."""
        n, done = len(batches.index), batches.first
        losses = torch.zeros(n, device=device)
        corrects = torch.zeros(n, dtype=torch.long, device=device)
        losses[:done] = torch.tensor(progress.losses[:done])
        corrects[:done] = torch.tensor(progress.corrects[:done], dtype=torch.long)
        sizes = torch.tensor([len(b) for b in batches.index], device=device, dtype=torch.float32)
        return cls(losses, corrects, sizes, done)

    @property
    def complete(self) -> bool:
        return self.done == len(self.losses)

    def means(self, replicas: Replicas) -> tuple[float, float]:
        """(train loss, train accuracy) of the epoch over every rank's images."""
        loss_sum = (self.losses * self.sizes).sum()
        totals = replicas.sum(torch.stack([loss_sum, self.corrects.sum().float(), self.sizes.sum()])).tolist()
        return totals[0] / totals[2], totals[1] / totals[2]


def step_shares(sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Each batch's share of the images of its optimizer step (k batches, fewer at the end):
    its loss weight, so a step's gradient is the mean over all of the step's images."""
    step = torch.arange(len(sizes), device=sizes.device) // k
    totals = torch.zeros(int(step[-1]) + 1, device=sizes.device).index_add_(0, step, sizes)
    return sizes / totals[step]


class StepRunner:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        criterion: nn.Module,
        schedule: Schedule,
        runtime: Runtime,
        augment: Augment | None,
        replicas: Replicas,
        stop: StopSignal,
        writer: RunWriter | None,
        ema: WeightAverage | None,
    ):
        self.optimizer, self.scaler, self.criterion = optimizer, scaler, criterion
        self.schedule, self.runtime, self.augment = schedule, runtime, augment
        self.replicas, self.stop, self.writer = replicas, stop, writer
        self.accumulate, self.clip, self.ema = schedule.cfg.accumulate_steps, schedule.cfg.grad_clip_norm, ema
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def run(
        self, epoch: int, forward: nn.Module, batches: EpochBatches, labels: torch.Tensor, progress: Progress
    ) -> StepStats:
        """Train the epoch's remaining batches, `accumulate` to an optimizer step; stop early
        (stats not `complete`) where the ranks agreed on a stop signal, which they vote on only
        between optimizer steps, so a resumed epoch starts on a step's first batch."""
        stats = StepStats.start(batches, progress, self.runtime.device)
        first, n, k = self.schedule.global_step(epoch), len(batches.index), self.accumulate
        shares = step_shares(stats.sizes, k)
        shown = None if self.replicas.main else True  # only rank 0 draws progress
        with tqdm(total=n, initial=stats.done, desc=f"epoch {epoch}", leave=False, disable=shown) as bar:
            for step, inputs in enumerate(batches.inputs, start=batches.first):
                update, ends = step // k, (step + 1) % k == 0 or step + 1 == n  # the epoch's optimizer step
                if step % k == 0 or step == batches.first:
                    set_lrs(self.optimizer, self.schedule, first + update)
                    self.optimizer.zero_grad(set_to_none=True)
                truth = labels[batches.index[step]]
                inputs, targets = self.augment.mix(inputs, truth, epoch, step) if self.augment else (inputs, truth)
                stats.losses[step], stats.corrects[step] = self.backward(
                    forward, inputs, targets, truth, shares[step], ends
                )
                stats.done = step + 1
                bar.update()
                if ends and self._update(stats, epoch, first + update, bar):
                    break
        return stats

    def backward(
        self,
        forward: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        truth: torch.Tensor,
        share: torch.Tensor,
        sync: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's gradients, its loss weighted by its share of the optimizer step's
        images; `targets` are the labels, or MixUp/CutMix's soft labels, while accuracy counts
        the unmixed labels (`truth`). DDP all-reduces only on a step's last batch."""
        with forward.no_sync() if isinstance(forward, DistributedDataParallel) and not sync else nullcontext():
            with self.runtime.autocast():
                logits = forward(inputs)
            loss = self.criterion(logits.float(), targets)
            self.scaler.scale(loss * share).backward()
        return loss.detach(), correct(logits, truth)

    def _update(self, stats: StepStats, epoch: int, global_step: int, bar: tqdm) -> bool:
        """The optimizer step (gradients clipped after fp16's unscaling), the weight average,
        and the host sync every few steps; whether every rank stops here."""
        self.optimizer_step()
        if self.ema is not None:
            self.ema.update()
        update = global_step - self.schedule.global_step(epoch)
        last = stats.complete
        stop = self.replicas.stop_after(update, last, self.stop.requested)
        if (update + 1) % CHECK_EVERY == 0 or last or stop:
            self._check(stats, epoch, global_step, bar)
        return stop and not last

    def optimizer_step(self) -> None:
        """Clip (after fp16's unscaling) and step: the scaler skips a step whose gradients overflowed."""
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _check(self, stats: StepStats, epoch: int, global_step: int, bar: tqdm) -> None:
        """The host sync every few steps: stop on a non-finite loss, show and log the last one."""
        done = stats.losses[: stats.done]
        bad = torch.nonzero(~torch.isfinite(done))
        if self.replicas.any(bool(len(bad))):  # every rank stops, none waits in a collective
            where = (
                f"{done[int(bad[0])].item()} at epoch {epoch}, step {int(bad[0]) + 1}"
                if len(bad)
                else (f"non-finite on another process in epoch {epoch}")
            )
            raise FinetuneError(
                f"loss became {where}; lower train.lr_head / train.lr_backbone or check the data "
                "(best.pt and last.pt were left as they were)"
            )
        loss = done[-1].item()
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if self.writer:
            self.writer.step(global_step + 1, loss, group_lrs(self.optimizer))
