"""The Trainer: epoch loop, evaluation, precision, feature-cache use, resumable state.

Every random draw of an epoch (order, flips) is a function of (seed, epoch), and the torch
RNG (dropout) is saved with each checkpoint, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from finetune.augment import Augment
from finetune.checkpoint import BestTracker
from finetune.config import Config
from finetune.data import BatchTransform, DataSplits, class_counts, epoch_plan, split_batches
from finetune.distributed import (
    SINGLE,
    Ranks,
    any_rank,
    check_same_weights,
    from_main,
    gather,
    shard,
    shard_size,
    total,
)
from finetune.early_stopping import EarlyStopping
from finetune.errors import FinetuneError, Interrupted
from finetune.features import (
    CacheDecision,
    CutModel,
    FeatureCache,
    FeatureStore,
    cache_key,
    decide_cache,
    empty_cache,
    extract,
    needed_variants,
)
from finetune.freezing import (
    apply_stage,
    build_optimizer,
    group_lrs,
    load_optimizer_state,
    set_lrs,
    set_train_mode,
    trainable_count,
)
from finetune.hardware import Runtime
from finetune.losses import class_weights
from finetune.models import BuiltModel
from finetune.results import EpochRecord, ResultsLog
from finetune.runwriter import RunWriter
from finetune.schedule import Schedule

CHECK_EVERY = 10  # steps between host syncs (progress bar, NaN check)


@dataclass
class Progress:
    """Where training stands: completed epochs and, mid-epoch, the steps done so far."""

    epoch: int = 0
    step: int = 0
    losses: list = field(default_factory=list)  # per step; under DDP one list per rank
    corrects: list = field(default_factory=list)
    seconds: float = 0.0
    world: int = 1  # processes that trained the steps of a part-done epoch


@dataclass
class EvalResult:
    loss: float
    acc: float
    balanced_acc: float
    per_class: dict[str, float]
    confusion: np.ndarray  # rows: true class


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
    ):
        """`writer` writes the run; under DDP only rank 0 has one."""
        self.cfg, self.data, self.runtime, self.run_dir = cfg, data, runtime, Path(run_dir)
        self.writer, self.ranks = writer, ranks
        self.device = runtime.device
        self.model = built.model.to(self.device, memory_format=runtime.layout)
        self.built = built
        self.head = self.model.get_submodule(built.head_name)
        augment = cfg.data.augment
        self.augment = Augment(augment, cfg.data.image_size, data.num_classes, cfg.seed) if augment.active else None
        self.transform = BatchTransform(cfg.data.image_size, built.mean, built.std, self.device, runtime.layout)
        self.train_set, self.val_set = data.train.to(self.device), data.val.to(self.device)
        self.train_labels = data.train.labels.to(self.device)
        self.val_labels = data.val.labels
        self.weights = class_weights(
            cfg.train.class_weights, class_counts(data.train.labels, data.num_classes), data.class_names
        )
        weight = self.weights.to(self.device) if self.weights is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
        self.progress = Progress()
        steps = len(split_batches(torch.arange(shard_size(len(data.train), ranks)), cfg.data.batch_size))
        lr_scale = ranks.world if cfg.train.scale_lr == "linear" else 1
        self.schedule = Schedule(cfg.train, self.model, built.head_name, steps, lr_scale)
        self.optimizer = build_optimizer(cfg.train, self.model, self.schedule)
        self.scaler = runtime.grad_scaler()
        self.best = BestTracker(cfg.checkpoint.monitor)
        self.stopping = EarlyStopping(cfg.train.early_stopping, cfg.checkpoint.monitor)
        self.log = ResultsLog()
        self.wrapped: tuple[tuple, nn.Module] | None = None
        self.decision: CacheDecision | None = None
        self.cache: FeatureCache | None = None
        self.cache_key = ""
        self.store = store or FeatureStore(Path(cfg.out_dir) / ".feature_cache")
        self.stop_signal: int | None = None
        self.epoch_train = (math.nan, math.nan)

    # ---- resume -------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        """Put model, optimizer, scaler, early-stopping state, RNG and logs back.

        Every group is in the optimizer from the first step and the LRs are a function of
        the step, so nothing about the schedule needs restoring beyond the step itself.
        """
        self.progress = Progress(**state["progress"])
        if self.progress.step and self.progress.world != self.ranks.world:
            print(
                f"the run stopped inside epoch {self.progress.epoch + 1} with {self.progress.world} process(es), "
                f"now {self.ranks.world}: that epoch starts over (its first steps stay in the weights)"
            )
            self.progress = Progress(epoch=self.progress.epoch, world=self.ranks.world)
        elif self.ranks.many:  # each rank continues its own part of the epoch
            rank = self.ranks.rank
            self.progress.losses, self.progress.corrects = self.progress.losses[rank], self.progress.corrects[rank]
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.best = BestTracker(self.cfg.checkpoint.monitor, **state.get("best", state.get("saver", {})))
        self.stopping = EarlyStopping(
            self.cfg.train.early_stopping, self.cfg.checkpoint.monitor, **state.get("stopping", {})
        )
        self.log = ResultsLog(state["rows"])
        if self.writer:
            self.writer.results(self.log)
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def resume_step(self) -> int:
        """The global step training continues from (0 for a new run)."""
        return self._global_step(self.progress.epoch + 1, self.progress.step)

    def portable_state(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What best.pt holds: enough to rebuild and use the model with no config at hand."""
        return {
            "format": 1,
            "arch": self.cfg.model.arch,
            "torchvision_weights": self.built.torchvision_weights,
            "head_name": self.built.head_name,
            "class_names": list(self.data.class_names),
            "image_size": self.cfg.data.image_size,
            "mean": list(self.built.mean),
            "std": list(self.built.std),
            "epoch": self.progress.epoch,
            "metrics": metrics,
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }

    def resume_state(self, metrics: dict[str, float]) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            **self.portable_state(metrics),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
            "progress": vars(self.progress).copy(),
            "best": self.best.state(),
            "stopping": self.stopping.state(),
            "rows": self.log.rows,
        }

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        epochs = range(self.progress.epoch + 1, self.cfg.train.epochs + 1)
        bar = tqdm(epochs, desc="epochs", disable=None, leave=False, total=self.cfg.train.epochs)
        try:
            bar.update(self.progress.epoch)
            for epoch in bar:
                self.run_epoch(epoch)
                if self.stopping.stopped_epoch is not None:
                    break
        finally:
            bar.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return self.summary()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once

    def run_epoch(self, epoch: int) -> None:
        """Ask the schedule what trains, train the steps, evaluate, write the epoch."""
        apply_stage(self.model, self.schedule, epoch)
        started = time.perf_counter()
        cut = self._cached_cut(epoch)
        set_train_mode(self.model, self.schedule, epoch)
        losses, corrects = self._train_steps(epoch, cut, started)
        try:
            result = self.evaluate(cut)
        except Interrupted:  # the steps are done: keep them, evaluate again on resume
            self._save_interrupted(epoch, len(losses), losses, corrects, started)
        self._finish_epoch(epoch, result, time.perf_counter() - started + self.progress.seconds)

    def _unless_stopped(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Batches of a long extraction or evaluation, ended within one batch of Ctrl-C / SIGTERM.

        Under DDP the ranks extract different amounts and agree on stopping only at training
        steps (a collective per batch here could wait on a rank that has none), so there a
        signal takes effect at the next step.
        """
        for batch in batches:
            if self.stop_signal and not self.ranks.many:
                raise Interrupted(self.stop_signal, self.run_dir)
            yield batch

    def _cached_cut(self, epoch: int) -> CutModel | None:
        """The cut whose input is cached for this epoch, with the activations this epoch draws."""
        if self.decision is None or epoch not in self.decision.epochs:
            sizes = len(self.data.train), len(self.data.val)
            self.decision = decide_cache(self.cfg, self.schedule, self.model, epoch, *sizes, self.runtime)
        cut = self.decision.cut
        if cut is None:
            self.cache = None
            return None
        on_disk = cut.cut == self.built.head_name and self.ranks.main  # below the head: too big to keep
        if self.cache is None or self.cache.cut != cut.cut:
            self.cache_key = self._cache_key() if on_disk else ""
            self.cache = self.store.load(self.cache_key, cut.cut, self.device) if on_disk else None
            if self.cache is None:
                val = self._activations(cut, self.val_set.in_order(self.cfg.data.batch_size), flip=False)
                self.cache = empty_cache(cut.cut, len(self.data.train), val)
        if self._fill(cut, epoch) and on_disk:
            self.store.save(self.cache_key, self.cache)
        return cut

    def _fill(self, cut: CutModel, epoch: int) -> bool:
        """Compute the (image, flip) pairs this epoch draws that the cache lacks; each epoch
        computes only its own, so a stage's first epoch costs no more than the full forward."""
        bs = self.cfg.data.batch_size
        needed = needed_variants(len(self.data.train), self.cfg.seed, [epoch], self.cfg.data.hflip, self.ranks)
        return self.cache.fill(
            needed, lambda index, flip: self._activations(cut, self.train_set.batches(index.split(bs)), flip)
        )

    def _cache_key(self) -> str:
        settings = (self.cfg.model.arch, self.transform.size, self.built.mean, self.built.std, self.runtime.describe())
        fingerprints = [self.train_set.fingerprint(), self.val_set.fingerprint()]
        return cache_key(self.model, self.built.head_name, fingerprints, "|".join(map(str, settings)))

    def _activations(self, cut: CutModel, images: Iterator[torch.Tensor], flip: bool) -> torch.Tensor:
        """The cut's inputs for uint8 batches, every image flipped or none."""
        batches = (self.transform(x, torch.ones(len(x), dtype=torch.bool) if flip else None) for x in images)
        return extract(cut, self.runtime, self._unless_stopped(batches))

    def _train_steps(self, epoch: int, cut: CutModel | None, started: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's remaining steps; returns every step's loss and correct count."""
        n = len(self.data.train)
        order, flips = epoch_plan(n, self.cfg.seed, epoch, self.cfg.data.hflip)
        order, flips = shard(order, self.ranks).to(self.device), flips.to(self.device)
        batches = split_batches(order, self.cfg.data.batch_size)  # on the device: no copies per step
        forward = self._forward(epoch, cut)
        first_step = self._global_step(epoch)
        done = self.progress.step
        losses = torch.zeros(len(batches), dtype=torch.float64, device=self.device)
        corrects = torch.zeros(len(batches), dtype=torch.long, device=self.device)
        losses[:done] = torch.tensor(self.progress.losses[:done], dtype=torch.float64)
        corrects[:done] = torch.tensor(self.progress.corrects[:done], dtype=torch.long)
        todo = batches[done:]
        if cut is not None:
            inputs_per_step = (self.cache.train_inputs(i, flips[i]) for i in todo)
        else:
            hflip, augment = self.cfg.data.hflip, self.augment
            inputs_per_step = (
                self.transform(x, flips[i] if hflip else None, augment and partial(augment.images, epoch=epoch, step=s))
                for s, (i, x) in enumerate(zip(todo, self.train_set.batches(todo), strict=True), start=done)
            )
        with tqdm(total=len(batches), initial=done, desc=f"epoch {epoch}", disable=None, leave=False) as bar:
            for step, inputs in enumerate(inputs_per_step, start=done):
                index = batches[step]
                set_lrs(self.optimizer, self.schedule, first_step + step)
                labels = self.train_labels[index]
                inputs, targets = self.augment.mix(inputs, labels, epoch, step) if self.augment else (inputs, labels)
                losses[step], corrects[step] = self._step(forward, inputs, targets, labels)
                bar.update()
                last = step + 1 == len(batches)
                stop = any_rank(self.stop_signal is not None, self.ranks)  # every rank stops at the same step
                if (step + 1) % CHECK_EVERY == 0 or last or stop:
                    self._check_finite(losses, epoch, step)
                    loss = losses[step].item()
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                    if self.writer:
                        self.writer.step(first_step + step + 1, loss, group_lrs(self.optimizer))
                if stop and not last:
                    self._save_interrupted(epoch, step + 1, losses, corrects, started)
        sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64, device=self.device)
        loss_sum, correct, count = total([(losses * sizes).sum().item(), corrects.sum().item(), len(order)], self.ranks)
        self.epoch_train = (loss_sum / count, correct / count)
        return losses, corrects

    def _global_step(self, epoch: int, step: int = 0) -> int:
        """Steps done before `step` of `epoch` (1-based epoch): the x axis of TensorBoard."""
        return (epoch - 1) * self.schedule.steps_per_epoch + step

    def _forward(self, epoch: int, cut: CutModel | None) -> nn.Module:
        """What a training step calls: the model, or the top above the cached cut; under DDP
        wrapped, and wrapped anew whenever the stage or cut changes. DDP's reducer registers the
        parameters that require grad when it is built, so one built before an unfreeze would
        never all-reduce the newly trainable ones (Lightning #20340 is that failure)."""
        module = cut if cut is not None else self.model
        if not self.ranks.many:
            return module
        key = (self.schedule.stage(epoch), cut.cut if cut is not None else None)
        if self.wrapped is None or self.wrapped[0] != key:
            devices = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = (key, DistributedDataParallel(module, device_ids=devices))
        return self.wrapped[1]

    def _step(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; `targets` are the labels, or MixUp/CutMix's soft labels."""
        with self.runtime.autocast():
            logits = forward(inputs)
        loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), (logits.argmax(1) == labels).sum()

    def _check_finite(self, losses: torch.Tensor, epoch: int, step: int) -> None:
        bad = torch.nonzero(~torch.isfinite(losses[: step + 1]))
        if len(bad):
            first = int(bad[0])
            raise FinetuneError(
                f"loss became {losses[first].item()} at epoch {epoch}, step {first + 1}; lower train.lr_head / "
                "train.lr_backbone or check the data (best.pt and last.pt were left as they were)"
            )

    def _save_interrupted(self, epoch: int, steps: int, losses: torch.Tensor, corrects: torch.Tensor, started: float):
        mine = (losses[:steps].tolist(), corrects[:steps].tolist())
        if self.ranks.many:
            mine = tuple(zip(*gather(mine, self.ranks), strict=True))
        self.progress = Progress(
            epoch=epoch - 1,
            step=steps,
            losses=list(mine[0]),
            corrects=list(mine[1]),
            seconds=self.progress.seconds + time.perf_counter() - started,
            world=self.ranks.world,
        )
        if self.writer:
            self.writer.last(self.resume_state(metrics={}))
        raise Interrupted(self.stop_signal or signal.SIGTERM, self.run_dir)

    @torch.inference_mode()
    def evaluate(self, cut: CutModel | None) -> EvalResult:
        self.model.eval()
        chunks = []
        with self.runtime.autocast():
            if cut is not None:
                for activations in self._unless_stopped(self.cache.val.split(self.cfg.data.batch_size * 2)):
                    chunks.append(cut.top(activations).float())
            else:
                for images in self._unless_stopped(self.val_set.in_order(self.cfg.data.batch_size * 2)):
                    chunks.append(self.model(self.transform(images)).float())
        logits = torch.cat(chunks).cpu()
        return from_main(score(logits, self.val_labels, self.data.class_names), self.ranks)

    def _check_model_finite(self, epoch: int, result: EvalResult) -> None:
        """A model whose evaluation loss or head is not finite is never written to disk."""
        if math.isfinite(result.loss) and all(bool(torch.isfinite(p).all()) for p in self.head.parameters()):
            return
        raise FinetuneError(
            f"the model became non-finite in epoch {epoch} (validation loss {result.loss}); lower "
            "train.lr_head / train.lr_backbone (best.pt and last.pt were left as they were)"
        )

    def _finish_epoch(self, epoch: int, result: EvalResult, seconds: float) -> None:
        self._check_model_finite(epoch, result)
        train_loss, train_acc = self.epoch_train
        metrics = {"val_acc": result.acc, "val_loss": result.loss, "val_balanced_acc": result.balanced_acc}
        self.progress = Progress(epoch=epoch, world=self.ranks.world)
        is_best = self.best.update(epoch, metrics)
        if is_best and self.writer:
            self.writer.best(self.portable_state(metrics), result.confusion, self._global_step(epoch + 1))
        new_stage = epoch > 1 and self.schedule.stage(epoch) != self.schedule.stage(epoch - 1)
        stopped = self.stopping.update(epoch, metrics[self.cfg.checkpoint.monitor], new_stage)
        record = EpochRecord(
            epoch=epoch,
            stage=self.schedule.stage(epoch),
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=result.loss,
            val_acc=result.acc,
            val_balanced_acc=result.balanced_acc,
            trainable_params=trainable_count(self.model),
            epoch_seconds=seconds,
            lrs=group_lrs(self.optimizer),
            val_acc_per_class=result.per_class,
        )
        self.log.append(record, self.best.best_epoch)
        if self.ranks.many:
            checksum = check_same_weights(self.model, self.ranks)
            tqdm.write(f"weights identical on {self.ranks.world} ranks (checksum {checksum:.6f})")
        if self.writer:
            self.writer.epoch(self.resume_state(metrics), self.log, self.summary(), self._global_step(epoch + 1))
        tqdm.write(_epoch_line(record, self.cfg.train.epochs, is_best))
        if stopped:
            tqdm.write(f"early stop after epoch {epoch}: {self.stopping.reason}")
        elif self.stop_signal and epoch < self.cfg.train.epochs:
            raise Interrupted(self.stop_signal, self.run_dir)

    def summary(self) -> dict[str, Any]:
        rows = self.log.rows
        seconds = [r["epoch_seconds"] for r in rows]
        stages = dict.fromkeys(r["stage"] for r in rows)
        return {
            "name": self.cfg.name,
            "epochs_completed": len(rows),
            "epochs": self.cfg.train.epochs,
            "monitor": self.cfg.checkpoint.monitor,
            "best_epoch": self.best.best_epoch,
            "best_value": self.best.best_value,
            "best_val_acc": max((r["val_acc"] for r in rows), default=None),
            "final_val_acc": rows[-1]["val_acc"] if rows else None,
            "final_val_balanced_acc": rows[-1]["val_balanced_acc"] if rows else None,
            "stopped_early": self.stopping.report(),
            "time_per_epoch": float(np.mean(seconds)) if seconds else None,
            "time_per_epoch_by_stage": {
                s: float(np.mean([r["epoch_seconds"] for r in rows if r["stage"] == s])) for s in stages
            },
            "total_seconds": float(sum(seconds)),
            "class_weights": self.weights.tolist() if self.weights is not None else None,
            "class_names": list(self.data.class_names),
            "train_size": len(self.data.train),
            "val_size": len(self.data.val),
            "device": str(self.device),
            "precision": self.runtime.precision,
            "memory_format": self.runtime.memory_format,
            "processes": self.ranks.world,
        }


def score(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalResult:
    """Loss (unweighted), accuracy, balanced accuracy and per-class accuracy on one split."""
    preds = logits.argmax(1).numpy()
    truth = labels.numpy()
    per_class = {}
    for index, name in enumerate(class_names):
        mask = truth == index
        per_class[name] = float((preds[mask] == index).mean()) if mask.any() else math.nan
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        acc=float((preds == truth).mean()),
        balanced_acc=float(balanced_accuracy_score(truth, preds)),
        per_class=per_class,
        confusion=confusion_matrix(truth, preds, labels=range(len(class_names))),
    )


def _epoch_line(r: EpochRecord, epochs: int, is_best: bool) -> str:
    return (
        f"epoch {r.epoch}/{epochs} {r.stage} | train loss {r.train_loss:.4f} acc {r.train_acc:.3f} | "
        f"val loss {r.val_loss:.4f} acc {r.val_acc:.3f} bal {r.val_balanced_acc:.3f} | "
        f"{r.epoch_seconds:.1f}s" + (" | best" if is_best else "")
    )
