"""Value checks on a typed Config, before any data or weights are loaded.

Every number a config can hold has a range in RANGES: finite, and no larger than a machine
can hold or a schedule can mean. An unbounded size is not a typo caught late, it is a plan
that runs for minutes or a train that never starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finetune.config.schema import (
    MULTILABEL_MONITORS,
    AugmentConfig,
    Config,
    DataConfig,
    StageConfig,
    TrainConfig,
    stage_name,
)
from finetune.errors import FinetuneError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
MAX_EPOCHS = 10_000
MAX_IMAGES = 10**8
MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range
MAX_FOLDS = 1000
MAX_LR = 1e38  # float32's largest is 3.4e38: any step at a larger LR makes every weight inf

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 60
_SHOW.maxlevel = 3


def show(value: Any) -> str:
    """`repr(value)` cut to fit one short line, however long or deeply nested the value."""
    return _SHOW.repr(value)


@dataclass(frozen=True)
class Range:
    """The values a number may take; `interval` says it as "in [low, high]" (fractions, probabilities)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    interval: bool = False

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range ("must be ..."), or None when it is in."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = value < self.high if self.high_open else value <= self.high
        if low_ok and high_ok:
            return None
        if self.interval:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must be in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if not low_ok:
            if self.low_open:
                return f"must be greater than {_num(self.low)}"
            return "must not be negative" if self.low == 0 else f"must be >= {_num(self.low)}"
        return f"must be at most {_num(self.high)}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


POSITIVE_LR = Range(0.0, MAX_LR, low_open=True)
EPOCHS = Range(0.0, float(MAX_EPOCHS))
FRACTION = Range(0.0, 1.0, interval=True)

RANGES: dict[str, Range] = {
    "seed": Range(0, MAX_SEED),
    "data.train_size": Range(0, MAX_IMAGES, low_open=True),
    "data.val_size": Range(0, MAX_IMAGES, low_open=True),
    "data.train_classes[]": Range(0, MAX_IMAGES),  # a class index (or a folder named by a number)
    "data.image_size": Range(16, 1024),  # plan and train probe the model at this size
    "data.batch_size": Range(0, 65_536, low_open=True),
    "data.num_workers": Range(0, 256),
    "data.memory_budget_mb": Range(0, 2**24),  # 16 TiB
    "data.split_seed": Range(0, MAX_SEED),
    "data.val_fraction": Range(0.0, 1.0, low_open=True, high_open=True, interval=True),
    "data.folds": Range(2, MAX_FOLDS),
    "data.fold": Range(0, MAX_FOLDS - 1),
    "data.augment.random_resized_crop.scale[]": Range(0.0, 1.0, low_open=True, interval=True),
    "data.augment.random_resized_crop.ratio[]": Range(0.0, 100.0, low_open=True, interval=True),
    "data.augment.color_jitter.brightness": Range(0.0, 10.0),
    "data.augment.color_jitter.contrast": Range(0.0, 10.0),
    "data.augment.color_jitter.saturation": Range(0.0, 10.0),
    "data.augment.color_jitter.hue": Range(0.0, 0.5, interval=True),
    "data.augment.random_erasing": FRACTION,
    "data.augment.mixup": Range(0.0, 100.0),  # Beta alpha
    "data.augment.cutmix": Range(0.0, 100.0),
    "train.epochs": Range(0, MAX_EPOCHS, low_open=True),
    "train.lr_head": POSITIVE_LR,
    "train.lr_backbone": POSITIVE_LR,
    "train.weight_decay": Range(0.0, 100.0),
    "train.unfreeze_epoch": Range(0, MAX_EPOCHS),
    "train.class_weights[]": Range(0.0, 1e6),
    "train.label_smoothing": Range(0.0, 1.0, high_open=True, interval=True),
    "train.focal_gamma": Range(0.0, 10.0),
    "train.grad_clip_norm": Range(0.0, 1e6, low_open=True),
    "train.accumulate_steps": Range(1, 65_536),
    "train.ema.decay": Range(0.0, 1.0, low_open=True, high_open=True, interval=True),
    "train.unfreeze[].epoch": Range(0, MAX_EPOCHS),
    "train.unfreeze[].lr": POSITIVE_LR,
    "train.unfreeze[].patience": Range(1, MAX_EPOCHS),
    "train.unfreeze[].min_delta": Range(0.0, 1e6),
    "train.unfreeze[].min_epochs": Range(1, MAX_EPOCHS),
    "train.unfreeze[].max_epochs": Range(1, MAX_EPOCHS),
    "train.layer_lr_decay": Range(1e-6, 1.0, interval=True),  # later (lower) stages learn slower
    "train.scheduler.warmup_epochs": EPOCHS,
    "train.scheduler.min_lr_ratio": FRACTION,
    "train.scheduler.step_epochs": Range(0.0, float(MAX_EPOCHS), low_open=True),
    "train.scheduler.gamma": Range(0.0, 1.0, low_open=True, interval=True),
    "train.unfreeze_warmup_epochs": EPOCHS,
    "train.early_stopping.patience": Range(1, MAX_EPOCHS),
    "train.early_stopping.min_delta": Range(0.0, 1e6),
}


def leaves(node: Any, key: str = "", pattern: str = "") -> Iterator[tuple[str, str, Any]]:
    """(RANGES key, key as printed, value) for every value in a config, inside lists and mappings too."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            name = f"{key}.{f.name}" if key else f.name
            yield from leaves(getattr(node, f.name), name, f"{pattern}.{f.name}" if pattern else f.name)
    elif isinstance(node, (list, dict)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for index, value in items:
            yield from leaves(value, f"{key}[{show(index)}]", f"{pattern}[]")
    else:
        yield pattern, key, node


def validate(cfg: Config) -> None:
    """Checks on values (not types) that would otherwise fail deep inside training."""
    for pattern, key, value in leaves(cfg):
        problem = _problem(pattern, value)
        if problem:
            raise FinetuneError(f"config: {key} = {show(value)} {problem}")
    d, t = cfg.data, cfg.train
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise FinetuneError(f"config: device = {show(cfg.device)} is invalid; use auto, cpu, cuda, cuda:N or mps")
    if cfg.name in ("", ".", "..") or "/" in cfg.name or not cfg.name.isprintable() or len(cfg.name.encode()) > 200:
        raise FinetuneError(f"config: name = {show(cfg.name)} must be a printable folder name without '/', 1-200 bytes")
    shorthand = t.unfreeze is None  # with stages, freeze_backbone / unfreeze_epoch are not used
    if shorthand and t.freeze_backbone and t.unfreeze_epoch is not None and not t.unfreeze_epoch < t.epochs:
        raise FinetuneError(
            f"config: train.unfreeze_epoch = {t.unfreeze_epoch} must be between 0 and "
            f"train.epochs - 1 = {t.epochs - 1}, or null to never unfreeze"
        )
    if d.train_classes == []:
        raise FinetuneError("config: data.train_classes = [] names no class; list some, or null for all")
    _validate_schedule(t)
    _validate_augment(d.augment)
    _validate_data_source(d)
    _validate_task(cfg)


def _problem(pattern: str, value: Any) -> str | None:
    if isinstance(value, str):  # names and paths: the OS takes no NUL, UTF-8 no lone surrogate
        encodable = "\0" not in value and not any("\ud800" <= c <= "\udfff" for c in value)
        return None if encodable else "holds a NUL or a lone surrogate character; use plain text"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return RANGES[pattern].problem(value)
    return None


def _validate_data_source(d: DataConfig) -> None:
    """A CSV dataset names its file; a fold exists among the folds."""
    if d.dataset == "csv" and not d.csv:
        raise FinetuneError("config: data.dataset = csv needs data.csv, the CSV file of image paths and labels")
    if d.folds is None and d.fold != 0:
        raise FinetuneError(f"config: data.fold = {d.fold} needs data.folds (the number of folds, e.g. 5)")
    if d.folds is not None and not d.fold < d.folds:
        raise FinetuneError(f"config: data.fold = {d.fold} must be between 0 and data.folds - 1 = {d.folds - 1}")


def _validate_task(cfg: Config) -> None:
    """Multi-label labels come from a CSV; a metric only one task has is not monitored by the other."""
    d, monitor = cfg.data, cfg.checkpoint.monitor
    if cfg.task == "multilabel" and d.dataset != "csv":
        raise FinetuneError(
            f"config: task = multilabel needs data.dataset = csv (labels joined by data.label_sep), not {d.dataset}"
        )
    if cfg.task == "multilabel" and d.train_classes is not None:
        raise FinetuneError("config: data.train_classes is for task multiclass; drop it (or fix data.classes)")
    if cfg.task == "multilabel" and d.sampler == "balanced":
        raise FinetuneError(
            "config: data.sampler = balanced needs one class per image; with task multilabel use shuffle"
        )
    if d.label_sep == "":
        raise FinetuneError("config: data.label_sep is empty; give the text that joins labels, e.g. ' ' or '|'")
    if d.classes is not None and d.dataset != "csv":
        raise FinetuneError(f"config: data.classes fixes the labels of a CSV; {d.dataset} names its own, drop it")
    if cfg.task == "multiclass" and monitor in MULTILABEL_MONITORS:
        raise FinetuneError(
            f"config: checkpoint.monitor = {monitor} exists only with task: multilabel; "
            "use val_acc, val_balanced_acc or val_loss (or auto)"
        )
    if d.classes is not None and (len(set(d.classes)) != len(d.classes) or not all(c.strip() for c in d.classes)):
        raise FinetuneError(f"config: data.classes = {show(d.classes)} must list distinct, non-empty names")
    joined = [c for c in d.classes or [] if d.label_sep in c]
    if cfg.task == "multilabel" and joined:
        raise FinetuneError(
            f"config: data.classes name {joined[0]!r}, which holds data.label_sep {d.label_sep!r}, so no cell can "
            "name it; join the CSV's labels with another data.label_sep (e.g. '|')"
        )


def _validate_augment(a: AugmentConfig) -> None:
    crop = a.random_resized_crop
    if crop is None:
        return
    scale, ratio = crop.scale, crop.ratio
    if not (len(scale) == 2 and scale[0] <= scale[1]):
        rule = "must be [low, high] with 0 < low <= high <= 1"
        raise FinetuneError(f"config: data.augment.random_resized_crop.scale = {show(scale)} {rule}")
    if not (len(ratio) == 2 and ratio[0] <= ratio[1]):
        rule = "must be [low, high] with 0 < low <= high"
        raise FinetuneError(f"config: data.augment.random_resized_crop.ratio = {show(ratio)} {rule}")


def _validate_stage_start(stage: StageConfig, key: str, epochs: int) -> None:
    """A fixed stage starts before the last epoch; a plateau stage has a window, not an epoch."""
    if stage.on_plateau:
        if stage.epoch is not None:
            raise FinetuneError(f"config: {key} starts on a plateau, so it takes no epoch; drop {key}.epoch")
        if stage.max_epochs is not None and stage.max_epochs < stage.min_epochs:
            raise FinetuneError(
                f"config: {key}.max_epochs = {stage.max_epochs} must be >= {key}.min_epochs = {stage.min_epochs}"
            )
    elif not (stage.epoch or 0) < epochs:
        raise FinetuneError(
            f"config: {key}.epoch = {stage.epoch} must be between 0 and train.epochs - 1 = {epochs - 1} "
            "(a stage's modules train from epoch `epoch + 1`)"
        )


def _validate_schedule(t: TrainConfig) -> None:
    """Values bound to train.epochs and stage names; module names are checked against the model in schedule.py."""
    warmup = t.scheduler.warmup_epochs
    if not warmup < t.epochs:
        raise FinetuneError(f"config: train.scheduler.warmup_epochs = {warmup} must be in [0, epochs)")
    names: set[str] = {"head"}
    for i, stage in enumerate(t.unfreeze or []):
        key = f"train.unfreeze[{i}]"
        _validate_stage_start(stage, key, t.epochs)
        if not stage.modules:
            raise FinetuneError(f"config: {key}.modules is empty; name modules such as layer4 or backbone")
        name = stage_name(stage)
        if name in names:
            raise FinetuneError(f"config: two train.unfreeze stages (or a stage and the head) are named {show(name)}")
        names.add(name)
