"""The Trainer: `fit` runs each epoch as stage -> cut -> steps -> evaluate -> book -> write -> stop.

Each of those is a small unit of its own (training/*.py); this file wires them and reads
top to bottom. Under DDP only rank 0 has a writer; every decision is agreed by all ranks.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from finetune.config.schema import Config
from finetune.data.augment import Augment
from finetune.data.batching import BatchTransform
from finetune.data.sources import DataSplits
from finetune.errors import Interrupted
from finetune.model.build import BuiltModel
from finetune.model.freezing import apply_stage, build_optimizer, group_lrs, set_train_mode, trainable_count
from finetune.model.schedule import Schedule
from finetune.runs.writer import RunWriter
from finetune.runtime.distributed import SINGLE, Ranks
from finetune.runtime.resolve import Runtime
from finetune.training.balance import balanced_loss
from finetune.training.batches import BatchSource, steps_per_epoch
from finetune.training.book import EpochBook, EpochOutcome, epoch_line
from finetune.training.cache import CacheProvider
from finetune.training.ema import WeightAverage, evaluated_weights
from finetune.training.evaluator import Evaluator, require_finite
from finetune.training.features import CachePlanner, CutModel, FeatureStore
from finetune.training.replicas import Replicas, buffers, replicated
from finetune.training.stages import StageSwitch
from finetune.training.state import Progress, portable_state, restore_training, resume_state
from finetune.training.steps import StepRunner, StepStats
from finetune.training.stop import StopRequested, StopSignal

Judge = Callable[[int, float], str | None]  # (epoch, monitored value) -> why to stop the run now, or None


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: DataSplits,
        built: BuiltModel,
        runtime: Runtime,
        run_dir: Path,
        store: FeatureStore | None = None,
        writer: RunWriter | None = None,
        ranks: Ranks = SINGLE,
        judge: Judge | None = None,
    ):
        """`writer` writes the run; under DDP only rank 0 has one. `judge` (tune's pruner) is asked
        after each epoch once every stage trains; every rank passes one, rank 0's answer counts."""
        self.cfg, self.data, self.built, self.runtime = cfg, data, built, runtime
        self.judge = judge
        self.run_dir, self.writer, self.ranks = Path(run_dir), writer, ranks
        device = runtime.device
        self.model = built.model.to(device, memory_format=runtime.layout)
        self.compiled = torch.compile(self.model) if runtime.compile else self.model  # the whole forward's train step
        self.head = self.model.get_submodule(built.head_name)
        self.ema = WeightAverage(self.model, cfg.train.ema) if cfg.train.ema else None
        self.replicas, self.stop = Replicas(ranks, device), StopSignal(ranks)
        train_set, val_set = data.train.to(device), data.val.to(device)
        self.labels = data.train.labels.to(device)
        transform = BatchTransform(cfg.data.image_size, built.mean, built.std, device, runtime.layout)
        steps = steps_per_epoch(len(data.train), cfg.data.batch_size, ranks.world, cfg.train.accumulate_steps)
        self.schedule = Schedule(cfg.train, self.model, built.head_name, steps, runtime.lr_scale)
        self.optimizer = build_optimizer(cfg.train, self.model, self.schedule)
        self.scaler = runtime.grad_scaler()
        criterion, self.weights, self.balance = balanced_loss(cfg, data)
        criterion = criterion.to(device)
        self.thresholds: list[float] | None = None  # multilabel: those chosen at the last evaluation
        augment = Augment.for_run(cfg, data.num_classes, ranks.rank)
        planner = CachePlanner(cfg, self.schedule, self.model, len(train_set), len(val_set), runtime)
        store = store or FeatureStore(Path(cfg.out_dir) / ".feature_cache")
        sets, payer = (train_set, val_set), str(self.run_dir.resolve())  # payer: the run, in the caches' ledgers
        features = (planner, built, sets, transform, runtime, store, ranks, self.stop.guard, payer)
        self.features = CacheProvider(cfg, *features)
        self.batches = BatchSource(cfg, train_set, transform, augment, ranks, device)
        optimizing = (self.optimizer, self.scaler, criterion, self.schedule, runtime)
        self.steps = StepRunner(*optimizing, augment, self.replicas, self.stop, writer, self.ema)
        guard, batch, names = self.stop.guard, cfg.data.batch_size, data.class_names
        self.evaluate = Evaluator(self.model, transform, val_set, names, runtime, batch, guard, self.replicas, self.ema)
        self.book = EpochBook(cfg)
        self.stages = StageSwitch(self.schedule, cfg.checkpoint.monitor, self.model, self.ema)
        self.progress = Progress(world=ranks.world)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from last.pt: weights, optimizer, loss scale, RNG, progress and the book.

        LRs are a function of the step and every group is in the optimizer from the first
        step, so nothing about the schedule needs restoring beyond the step itself.
        """
        self.progress = Progress.restored(state["progress"], self.ranks)
        restore_training(state, self.model, self.optimizer, self.scaler, self.ema)
        self.book = EpochBook(self.cfg, state)
        self.stages.restore(state.get("stages"))
        self.thresholds = state.get("thresholds")
        if self.writer:
            self.writer.results(self.book.log)

    def resume_step(self) -> int:
        """The global step training continues from (0 for a new run)."""
        return self.schedule.global_step(self.progress.epoch + 1, self.progress.step // self.cfg.train.accumulate_steps)

    def fit(self) -> dict[str, Any]:
        shown = None if self.ranks.main else True
        bar = tqdm(total=self.cfg.train.epochs, initial=self.progress.epoch, desc="epochs", leave=False, disable=shown)
        with self.stop, bar:
            try:
                for epoch in range(self.progress.epoch + 1, self.cfg.train.epochs + 1):
                    self.run_epoch(epoch)
                    bar.update()
                    if self.book.ended():
                        break
            except StopRequested:
                raise Interrupted(self.stop.signum or signal.SIGTERM, self.run_dir) from None
        return self.summary()

    def enter(self, epoch: int) -> CutModel | None:
        """Put the model in `epoch`'s stage: what takes gradients, the cut (its activations
        ready), and which modules are in train mode."""
        apply_stage(self.model, self.schedule, epoch)
        cut = self.features.cut_for(epoch)
        set_train_mode(self.model, self.schedule, epoch)
        return cut

    def run_epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        cut = self.enter(epoch)
        forward = self.replicas.wrap(cut if cut is not None else self.compiled, (self.schedule.stage(epoch), cut))
        batches = self.batches.epoch(epoch, self.progress.step, cut, self.features.cache)
        stats = self.steps.run(epoch, forward, batches, self.labels, self.progress)
        if not stats.complete:
            self._interrupt(epoch, stats, started)
        self.replicas.share_buffers(buffers(self.model, self.ema))
        try:
            result = self.evaluate(cut, self.features.cache.val if cut is not None else None)
        except StopRequested:  # the steps are done: keep them, evaluate again on resume
            self._interrupt(epoch, stats, started)
        require_finite(result, self.head, epoch)
        self.thresholds = result.thresholds
        change = self.stages.after_epoch(epoch, result.metrics()[self.cfg.checkpoint.monitor])
        seconds = time.perf_counter() - started + self.progress.seconds
        last_stage = len(self.schedule.active(epoch)) == len(self.schedule.groups)
        outcome = self.book.close(
            epoch,
            self.schedule.stage(epoch),
            self.schedule.starts_stage(epoch),
            stats.means(self.replicas),
            result,
            seconds,
            self.features.cost,
            group_lrs(self.optimizer),
            trainable_count(self.model),
            self.features.decision.note,
            last_stage,
            change[0].describe(change[1]) if change else "",
        )
        if last_stage and self.judge is not None:
            self._ask_judge(epoch, outcome)
        self.progress = Progress(epoch=epoch, world=self.ranks.world)
        self._write(epoch, outcome)
        stop = self.replicas.any(self.stop.requested)  # every rank votes, so none waits in a collective
        if stop and not self.book.ended() and epoch < self.cfg.train.epochs:
            raise StopRequested

    def _ask_judge(self, epoch: int, outcome: EpochOutcome) -> None:
        """Prune the run when the judge says so: only once the last stage trains (a stage change's
        dip never prunes), before this epoch is written (last.pt then says the run is complete),
        never on its last epoch (that stops nothing). Rank 0's answer holds on every rank."""
        value = outcome.metrics[self.cfg.checkpoint.monitor]
        reason = self.replicas.from_main(self.judge(epoch, value) if self.ranks.main else None)
        if reason and not outcome.stopped and epoch < self.cfg.train.epochs:
            self.book.prune(epoch, reason)

    def _write(self, epoch: int, outcome: EpochOutcome) -> None:
        if self.ranks.many:
            checked = self.replicas.check_identical(replicated(self.model, self.ema))
            tqdm.write(f"weights identical on {self.ranks.world} ranks ({checked} tensors, every bit)")
        if self.writer:
            step = self.schedule.global_step(epoch + 1)
            if outcome.is_best:
                best = self.portable_state(outcome.metrics, evaluated_weights(self.model, self.ema))
                self.writer.best(best, outcome.confusion, step)
            self.writer.epoch(self.resume_state(outcome.metrics), self.book.log, self.summary(), step)
        tqdm.write(epoch_line(outcome.record, self.cfg.train.epochs, outcome.is_best))
        if outcome.record.next_stage:
            tqdm.write(f"next stage: {outcome.record.next_stage}")
        if outcome.stopped:
            tqdm.write(f"early stop after epoch {epoch}: {self.book.stopping.reason}")
        if self.book.pruned and self.book.pruned["epoch"] == epoch:
            tqdm.write(f"pruned after epoch {epoch}: {self.book.pruned['reason']}")

    def _interrupt(self, epoch: int, stats: StepStats, started: float) -> None:
        """Save the epoch's steps so far (every rank's) in last.pt, then stop."""
        mine = (stats.losses[: stats.done].tolist(), stats.corrects[: stats.done].tolist())
        losses, corrects = zip(*self.replicas.gather(mine), strict=True) if self.ranks.many else mine
        seconds = self.progress.seconds + time.perf_counter() - started
        self.progress = Progress(epoch - 1, stats.done, list(losses), list(corrects), seconds, self.ranks.world)
        if self.writer:
            self.writer.last(self.resume_state(metrics={}))
        raise StopRequested

    def portable_state(self, metrics: dict[str, float], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        portable = portable_state(self.cfg, self.built, self.data.class_names, self.progress.epoch, metrics, weights)
        return {**portable, "thresholds": self.thresholds}

    def resume_state(self, metrics: dict[str, float]) -> dict[str, Any]:
        portable = self.portable_state(metrics, self.model.state_dict())
        book, run = {**self.book.state(), "stages": self.stages.state()}, self.runtime
        return resume_state(
            portable, self.optimizer, self.scaler, self.progress, book, run.record(), run.device, self.ema
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            **self.book.summary(),
            "task": self.cfg.task,
            # multilabel: each label's positive weight
            "class_weights": self.weights.tolist() if self.weights is not None else None,
            "sampler": self.balance.sampler,
            "balance": self.balance.note,
            "class_names": list(self.data.class_names),
            "train_size": len(self.data.train),
            "val_size": len(self.data.val),
            "device": str(self.runtime.device),
            "precision": self.runtime.precision,
            "memory_format": self.runtime.memory_format,
            "runtime": self.runtime.record(),
            "stage_starts": {g.name: None if g.epoch is None else g.epoch + 1 for g in self.schedule.groups},
            "processes": self.ranks.world,
        }
