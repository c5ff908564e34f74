"""Config schema, defaults, YAML loading, `--set` overrides and validation.

Everything is checked here, before any data or weights are loaded, so a typo costs a
second, not an epoch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finetune.errors import FinetuneError


@dataclass
class CropConfig:
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])


@dataclass
class JitterConfig:
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class AugmentConfig:
    """Training-time augmentation of whole batches, per-sample (augment.py); eval never augments."""

    random_resized_crop: CropConfig | None = None
    color_jitter: JitterConfig | None = None
    trivial_augment: bool = False
    rand_augment: bool = False
    random_erasing: float = 0.0  # probability per image
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0

    @property
    def active(self) -> bool:
        return any(v not in (None, False, 0.0) for v in dataclasses.asdict(self).values())


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "imagefolder", "digits"] = "cifar10"
    root: str = "data"
    download: bool = True
    train_size: int | None = 3000
    val_size: int | None = 800
    subset: Literal["stratified", "random", "first"] = "stratified"
    train_classes: list[str | int] | None = None
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 0
    hflip: bool = True
    memory_budget_mb: int = 4096
    split_seed: int = 42  # draws subsets and the digits split; the run's `seed` draws the training
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    weights: str | None = "DEFAULT"


@dataclass
class StageConfig:
    """One step of gradual unfreezing: `modules` train from epoch `epoch + 1` at `lr`."""

    epoch: int = 0
    modules: list[str] = field(default_factory=list)
    lr: float | None = None
    name: str | None = None


@dataclass
class SchedulerConfig:
    name: Literal["constant", "cosine", "linear", "step", "onecycle"] = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: float = 1.0
    gamma: float = 0.1


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # null = off
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_head: float = 1.0e-3
    lr_backbone: float = 1.0e-4
    weight_decay: float = 0.0
    freeze_backbone: bool = True
    unfreeze_epoch: int | None = 1
    freeze_bn: bool = True
    class_weights: Literal["none", "auto"] | list[float] | dict[str | int, float] = "auto"
    label_smoothing: float = 0.0
    feature_cache: Literal["auto", "off"] = "auto"
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    scale_lr: Literal["none", "linear"] = "none"  # under torchrun: linear multiplies every LR by the world size
    unfreeze: list[StageConfig] | None = None
    layer_lr_decay: float = 1.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    unfreeze_warmup_epochs: float = 0.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class CheckpointConfig:
    monitor: Literal["val_acc", "val_loss", "val_balanced_acc"] = "val_acc"


@dataclass
class LogConfig:
    tensorboard: bool = False  # scalars per step and epoch, stage changes, confusion matrix: <run>/tensorboard


@dataclass
class Config:
    name: str = "run"
    seed: int = 42
    out_dir: str = "runs"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; with `train.unfreeze` the shorthand keys it replaces are left out."""
        raw = dataclasses.asdict(self)
        if self.train.unfreeze is not None:
            for key in SHORTHAND_KEYS:
                del raw["train"][key]
        else:
            del raw["train"]["unfreeze"]
        return raw


SHORTHAND_KEYS = ("freeze_backbone", "unfreeze_epoch")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FLOAT_PATTERN = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None), apply `--set` overrides."""
    raw = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, source=str(path) if path else "config")


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; syntax errors and python tags become one line with a line number."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FinetuneError(f"config file {path} not found: check the path") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"config file {path} cannot be read ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FinetuneError(f"{path}{where}: invalid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict, the value parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise FinetuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise FinetuneError(f"--set {key}: value {text!r} is not valid YAML; quote it") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FinetuneError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from a plain nested dict."""
    _check_one_unfreeze_form(raw, source)
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg)
    return cfg


def _check_one_unfreeze_form(raw: dict[str, Any], source: str) -> None:
    train = raw.get("train")
    if not isinstance(train, dict) or train.get("unfreeze") is None:
        return
    given = [f"train.{key}" for key in SHORTHAND_KEYS if key in train]
    if given:
        raise FinetuneError(
            f"{source}: train.unfreeze (stages) and the shorthand {' / '.join(given)} both say when to unfreeze; "
            f"drop {' and '.join(given)} (or drop train.unfreeze)"
        )


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise FinetuneError(f"{source}: {prefix.rstrip('.')} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise FinetuneError(f"{source}: unknown key {prefix}{key}{_suggest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.", source)
        elif _optional_dataclass(tp) and value is not None:
            values[key] = _build(_optional_dataclass(tp), value, f"{prefix}{key}.", source)
        elif _dataclass_list(tp) and isinstance(value, list):
            item_cls = _dataclass_list(tp)
            values[key] = [_build(item_cls, v, f"{prefix}{key}[{i}].", source) for i, v in enumerate(value)]
        else:
            values[key] = _check_type(value, tp, f"{prefix}{key}", source)
    return cls(**values)


def _optional_dataclass(tp: Any) -> type | None:
    """The section class of `SomeDataclass | None`, else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    return next((a for a in options if dataclasses.is_dataclass(a)), None)


def _dataclass_list(tp: Any) -> type | None:
    """The item class of `list[SomeDataclass]` (or `list[...] | None`), else None."""
    for option in typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,):
        args = typing.get_args(option)
        if typing.get_origin(option) is list and args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise naming the key.

    PyYAML reads `3e-4` (no dot) as a string and `off` as false; where a number or the
    word is expected they are taken as meant.
    """
    if float in (tp, *typing.get_args(tp)) and isinstance(value, str) and FLOAT_PATTERN.match(value):
        value = float(value)
    if isinstance(value, bool) and typing.get_origin(tp) is Literal and ("off" if not value else "on") in tp.__args__:
        value = "on" if value else "off"
    if _matches(value, tp):
        return float(value) if tp is float and isinstance(value, int) else value
    raise FinetuneError(f"{source}: {key} = {value!r} is invalid; expected {_describe(tp)}")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if dataclasses.is_dataclass(tp):
        return False  # reached only for a section given as something else than a mapping
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    raise TypeError(f"unsupported config type {tp}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "mappings of keys"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def validate(cfg: Config) -> None:
    """Checks on values (not types) that would otherwise fail deep inside training."""
    d, t = cfg.data, cfg.train
    positive = {
        "train.epochs": t.epochs,
        "train.lr_head": t.lr_head,
        "train.lr_backbone": t.lr_backbone,
        "data.batch_size": d.batch_size,
        "data.train_size": d.train_size,
        "data.val_size": d.val_size,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise FinetuneError(f"config: {key} = {value} must be greater than 0")
    non_negative = {"train.weight_decay": t.weight_decay, "data.num_workers": d.num_workers}
    non_negative["data.memory_budget_mb"] = d.memory_budget_mb
    for key, value in non_negative.items():
        if value < 0:
            raise FinetuneError(f"config: {key} = {value} must not be negative")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise FinetuneError(f"config: train.label_smoothing = {t.label_smoothing} must be in [0, 1)")
    if not DEVICE_PATTERN.match(cfg.device):
        raise FinetuneError(f"config: device = {cfg.device!r} is invalid; use auto, cpu, cuda, cuda:N or mps")
    if not cfg.name or "/" in cfg.name:
        raise FinetuneError(f"config: name = {cfg.name!r} must be a non-empty name without '/'")
    shorthand = t.unfreeze is None  # with stages, freeze_backbone / unfreeze_epoch are not used
    if shorthand and t.freeze_backbone and t.unfreeze_epoch is not None and not 0 <= t.unfreeze_epoch < t.epochs:
        raise FinetuneError(
            f"config: train.unfreeze_epoch = {t.unfreeze_epoch} must be between 0 and "
            f"train.epochs - 1 = {t.epochs - 1}, or null to never unfreeze"
        )
    weights = t.class_weights.values() if isinstance(t.class_weights, dict) else t.class_weights
    if isinstance(weights, Iterable) and not isinstance(weights, str) and any(not w >= 0 for w in weights):
        raise FinetuneError("config: train.class_weights must hold finite weights >= 0 (no negative or NaN weight)")
    if d.image_size < 16:
        raise FinetuneError(f"config: data.image_size = {d.image_size} is too small; use at least 16")
    for key, value in (("seed", cfg.seed), ("data.split_seed", d.split_seed)):
        if value < 0:
            raise FinetuneError(f"config: {key} = {value} must be 0 or a positive integer")
    if d.train_classes == []:
        raise FinetuneError("config: data.train_classes = [] names no class; list some, or null for all")
    _validate_schedule(t)
    _validate_augment(d.augment)


def _validate_augment(a: AugmentConfig) -> None:
    crop, jitter = a.random_resized_crop, a.color_jitter
    checks = [("data.augment.random_erasing", a.random_erasing, 0 <= a.random_erasing <= 1, "must be in [0, 1]")]
    checks += [(f"data.augment.{k}", v, v >= 0, "must be >= 0") for k, v in (("mixup", a.mixup), ("cutmix", a.cutmix))]
    if crop is not None:
        scale, ratio = crop.scale, crop.ratio
        ok = len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1
        checks.append(
            ("data.augment.random_resized_crop.scale", scale, ok, "must be [low, high] with 0 < low <= high <= 1")
        )
        ok = len(ratio) == 2 and 0 < ratio[0] <= ratio[1]
        checks.append(("data.augment.random_resized_crop.ratio", ratio, ok, "must be [low, high] with 0 < low <= high"))
    if jitter is not None:
        for key, value in dataclasses.asdict(jitter).items():
            limit = 0.5 if key == "hue" else float("inf")
            checks.append((f"data.augment.color_jitter.{key}", value, 0 <= value <= limit, f"must be in [0, {limit}]"))
    for key, value, ok, rule in checks:
        if not ok:
            raise FinetuneError(f"config: {key} = {value} {rule}")


def _validate_schedule(t: TrainConfig) -> None:
    """Stage epochs, LRs and scheduler values; module names are checked against the model in schedule.py."""
    s, stop = t.scheduler, t.early_stopping
    checks = [
        ("train.layer_lr_decay", t.layer_lr_decay, t.layer_lr_decay > 0, "must be greater than 0"),
        ("train.unfreeze_warmup_epochs", t.unfreeze_warmup_epochs, t.unfreeze_warmup_epochs >= 0, "must be >= 0"),
        ("train.scheduler.warmup_epochs", s.warmup_epochs, 0 <= s.warmup_epochs < t.epochs, "must be in [0, epochs)"),
        ("train.scheduler.min_lr_ratio", s.min_lr_ratio, 0 <= s.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("train.scheduler.step_epochs", s.step_epochs, s.step_epochs > 0, "must be greater than 0"),
        ("train.scheduler.gamma", s.gamma, 0 < s.gamma <= 1, "must be in (0, 1]"),
        ("train.early_stopping.patience", stop.patience, stop.patience is None or stop.patience >= 1, "must be >= 1"),
        ("train.early_stopping.min_delta", stop.min_delta, stop.min_delta >= 0, "must be >= 0"),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            raise FinetuneError(f"config: {key} = {value} {rule}")
    names = []
    for i, stage in enumerate(t.unfreeze or []):
        key = f"train.unfreeze[{i}]"
        if not 0 <= stage.epoch < t.epochs:
            raise FinetuneError(
                f"config: {key}.epoch = {stage.epoch} must be between 0 and train.epochs - 1 = {t.epochs - 1} "
                "(a stage's modules train from epoch `epoch + 1`)"
            )
        if not stage.modules:
            raise FinetuneError(f"config: {key}.modules is empty; name modules such as layer4 or backbone")
        if stage.lr is not None and stage.lr <= 0:
            raise FinetuneError(f"config: {key}.lr = {stage.lr} must be greater than 0")
        names.append(stage_name(stage))
    duplicate = next((n for n in names if names.count(n) > 1 or n == "head"), None)
    if duplicate is not None:
        raise FinetuneError(f"config: two train.unfreeze stages (or a stage and the head) are named {duplicate!r}")


def stage_name(stage: StageConfig) -> str:
    """A stage's parameter-group name: its `name`, else its modules joined by '+'."""
    return stage.name or "+".join(stage.modules)


def saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config saved by a run: runs from before `data.split_seed` drew their subsets with `seed`."""
    data = raw.setdefault("data", {})
    if isinstance(data, dict):
        data.setdefault("split_seed", raw.get("seed", DataConfig.split_seed))
    return raw


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; values inside a section stay whole."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
