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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finetune.errors import FinetuneError


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


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    weights: str | None = "DEFAULT"


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


@dataclass
class CheckpointConfig:
    monitor: Literal["val_acc", "val_loss", "val_balanced_acc"] = "val_acc"


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg)
    return cfg


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
        else:
            values[key] = _check_type(value, tp, f"{prefix}{key}", source)
    return cls(**values)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise naming the key.

    PyYAML reads `3e-4` (no dot) as a string and `off` as false; where a number or the
    word is expected they are taken as meant.
    """
    if tp is float and isinstance(value, str) and FLOAT_PATTERN.match(value):
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
    if t.freeze_backbone and t.unfreeze_epoch is not None and not 0 <= t.unfreeze_epoch < t.epochs:
        raise FinetuneError(
            f"config: train.unfreeze_epoch = {t.unfreeze_epoch} must be between 0 and "
            f"train.epochs - 1 = {t.epochs - 1}, or null to never unfreeze"
        )
    if isinstance(t.class_weights, list) and any(w < 0 for w in t.class_weights):
        raise FinetuneError("config: train.class_weights must not contain negative weights")
    if d.image_size < 16:
        raise FinetuneError(f"config: data.image_size = {d.image_size} is too small; use at least 16")


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
