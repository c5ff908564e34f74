"""One training run from a checked config to its finished run dir, and what the runs of a
sweep share.

`finetune train` and `finetune sweep` both call `Session.train`: cheap checks first, then
data, weights, the run dir, last.pt on resume, and the Trainer's loop. A session keeps the
decoded data of each data config and a feature store per folder (head-input caches held in
memory), so a sweep pays for each once; model/build.py keeps read weights per weights file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune.config.schema import Config
from finetune.data.csv_source import require_trained_labels
from finetune.data.sources import DataSplits, load_data
from finetune.errors import FinetuneError
from finetune.model.build import build_model, check_model_config, skeleton
from finetune.model.schedule import check_stages
from finetune.runs.checkpoint import load_checkpoint
from finetune.runs.rundir import is_finished
from finetune.runs.tracking import Link, Tracker, ending, open_on_main, open_run, sync
from finetune.runs.writer import RunWriter, dropped
from finetune.runtime.distributed import SINGLE, Ranks
from finetune.runtime.hardware import resolve_device
from finetune.runtime.resolve import Subject, check_precision, resolve_runtime
from finetune.training.features import FeatureStore
from finetune.training.loop import Judge, Trainer


class Session:
    def __init__(self, ranks: Ranks = SINGLE) -> None:
        self.ranks = ranks
        self.data: dict[str, DataSplits] = {}
        self.stores: dict[Path, FeatureStore] = {}

    def train(
        self, cfg: Config, run_dir: Path, resume: bool, judge: Judge | None = None, link: Link | None = None
    ) -> dict[str, Any] | None:
        """Train (or continue) one run; its summary, or None when it had nothing left to do.
        `judge`: tune's pruner, asked after each epoch of the last stage (Trainer); a run with
        one is a trial, which nothing trains again once it ends. With `tracking.mlflow` the run
        is an MLflow run (`link`: its parent, tags, the exporter), reached before any data loads."""
        link = link or Link()
        tracker = open_on_main(lambda: open_run(cfg, run_dir, link), self.ranks) if cfg.tracking.mlflow else None
        with ending(tracker):
            summary = self._train(cfg, run_dir, resume, judge, tracker)
        if tracker:
            sync(tracker, run_dir, cfg.train.epochs, link.export if cfg.tracking.mlflow.log_model else None)
        return summary

    def _train(
        self, cfg: Config, run_dir: Path, resume: bool, judge: Judge | None, tracker: Tracker | None
    ) -> dict[str, Any] | None:
        ended = _ended_without_last(run_dir) if resume else None
        if ended is not None:
            return _complete_without_last(run_dir, ended, trial=judge is not None)
        state = _resume_state(run_dir) if resume else None
        trainer = self.prepare(cfg, run_dir, state.get("runtime") if state else None, judge, tracker=tracker)
        if state is not None:
            trainer.restore(state)
            print(f"resuming {run_dir} after epoch {trainer.progress.epoch}, step {trainer.progress.step}")
            _say_if_schedule_stretched(state["config"]["train"]["epochs"], cfg)
        if trainer.writer:
            trainer.writer.start(cfg, trainer.resume_step())
        reason = _end_reason(trainer.book.stopped_early(), trainer.book.pruned)
        if reason is not None:
            print(f"{run_dir} is complete: {reason}")
            return None
        if trainer.progress.epoch >= cfg.train.epochs:
            print(f"{run_dir} already finished {cfg.train.epochs} epochs; raise --set train.epochs=N to train longer")
            return None
        try:
            summary = trainer.fit()
        finally:
            if trainer.writer:
                trainer.writer.close()
        if trainer.writer:
            trainer.writer.drop(dropped(cfg.checkpoint.keep, summary, trial=judge is not None))
        return summary

    def prepare(
        self,
        cfg: Config,
        run_dir: Path,
        recorded: dict[str, Any] | None = None,
        judge: Judge | None = None,
        write: bool = True,
        tracker: Tracker | None = None,
    ) -> Trainer:
        """Validate what is cheap to check, then load data and weights: a Trainer whose writer
        (rank 0's, unless `write` is off: lr-find writes no run) writes the run dir.

        `recorded`: the runtime choice a resumed run's last.pt holds, kept so resume stays exact.
        """
        check_model_config(cfg.model)
        check_precision(cfg.precision, resolve_device(cfg.device))
        if cfg.train.unfreeze is not None:  # stage names against the arch, before any data loads
            bare = skeleton(cfg.model, num_classes=2)
            check_stages(cfg.train, bare.model, bare.head_name)
        torch.manual_seed(cfg.seed)
        data = self._data(cfg)
        built = build_model(cfg.model, data.num_classes)
        subject = Subject(built.model, built.head_name, len(data.train), len(data.val))
        runtime = resolve_runtime(cfg, subject, self.ranks, recorded)
        print(
            f"{cfg.name}: {cfg.model.arch} on {len(data.train)} train / {len(data.val)} val images, "
            f"{data.num_classes} classes, {runtime.describe()}" + (f", run dir {run_dir}" if write else "")
        )
        if self.ranks.many:
            print(
                f"{self.ranks.world} processes, data.batch_size {cfg.data.batch_size} per process "
                f"({cfg.data.batch_size * self.ranks.world * cfg.train.accumulate_steps} images per optimizer step)"
            )
        folder = Path(cfg.out_dir) / ".feature_cache"
        store = self.stores.setdefault(folder, FeatureStore(folder))
        writer = RunWriter(run_dir, tracker) if self.ranks.main and write else None
        trainer = Trainer(cfg, data, built, runtime, run_dir, store, writer, self.ranks, judge)
        if trainer.balance.note:
            print(trainer.balance.note)
        return trainer

    def _data(self, cfg: Config) -> DataSplits:
        key = repr((cfg.data, cfg.task))
        if key not in self.data:
            self.data[key] = training_data(cfg)
        return self.data[key]


def training_data(cfg: Config) -> DataSplits:
    """The images a run trains and validates on. A multilabel run's validation labels must each
    be carried by a training image too, after folds and subsets (eval and export, which load a
    token training set, do not ask)."""
    data = load_data(cfg.data, cfg.task == "multilabel")
    if cfg.task == "multilabel":
        labels = data.train.labels.numpy(), data.val.labels.numpy()
        require_trained_labels(data.class_names, *labels, Path(str(cfg.data.csv)))
    return data


def _end_reason(stopped: dict[str, Any] | None, pruned: dict[str, Any] | None) -> str | None:
    """Why a run is complete before its last epoch, as resume says it; None if it is not."""
    if stopped is not None:
        return f"stopped early at epoch {stopped['epoch']} ({stopped['reason']})"
    if pruned is not None:
        return f"pruned at epoch {pruned['epoch']} ({pruned['reason']})"
    return None


def _ended_without_last(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that ended (its epochs trained, or stopped for good) and has no
    last.pt: `checkpoint.keep` dropped it then. A run that had not ended resumes as before."""
    path = run_dir / "summary.json"
    if (run_dir / "last.pt").exists() or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if is_finished(summary, summary["epochs"]) else None


def _complete_without_last(run_dir: Path, summary: dict[str, Any], trial: bool) -> None:
    """A pruned or early-stopped run, or a tune trial (whose worker died before telling the
    study), is complete; a run that trained its epochs cannot be continued without last.pt."""
    epochs = summary["epochs_completed"]
    reason = _end_reason(summary.get("stopped_early"), summary.get("pruned"))
    if reason is None and not trial:
        raise FinetuneError(
            f"--resume {run_dir}: the run ended after epoch {epochs} and has no last.pt (checkpoint.keep best or "
            "results drops it then), so nothing can continue it; start a new run (checkpoint.keep: all keeps last.pt)"
        )
    print(f"{run_dir} is complete: {reason or f'trained its {epochs} epochs'}; its last.pt was dropped")


def _resume_state(run_dir: Path) -> dict | None:
    """last.pt of the run, or None when it was stopped before its first checkpoint."""
    last = run_dir / "last.pt"
    if not last.exists():
        print(f"{run_dir} has no last.pt yet: starting it from the beginning with its saved config")
        return None
    state = load_checkpoint(last)
    if "progress" not in state:
        raise FinetuneError(f"--resume: {last} holds no training state; it cannot be resumed")
    return state


def _say_if_schedule_stretched(saved_epochs: int, cfg: Config) -> None:
    """Raising train.epochs re-plans a decaying schedule over the new length (README: Schedules)."""
    name = cfg.train.scheduler.name
    if cfg.train.epochs > saved_epochs and name in ("cosine", "linear", "onecycle"):
        print(
            f"train.epochs raised from {saved_epochs} to {cfg.train.epochs}: the {name} schedule now spans "
            f"{cfg.train.epochs} epochs, so the LR continues from this step along the longer curve"
        )
