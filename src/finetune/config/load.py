"""Reading a config: a YAML file, `--set` overrides, and the schema's types checked per key.

Everything is checked before any data or weights are loaded (values in check.py),
so a typo costs a second, not an epoch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finetune.config.check import show, validate
from finetune.config.schema import SHORTHAND_KEYS, Config, DataConfig
from finetune.errors import FinetuneError

FLOAT_PATTERN = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None), apply `--set` overrides."""
    raw = read_yaml(Path(path)) if path is not None else {}
    apply_overrides(raw, overrides)
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
        data = _parse(text, str(path))
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


def _parse(text: str, where: str) -> Any:
    """yaml.safe_load; a document nested deeper than Python's stack is one line, not a traceback."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise FinetuneError(f"{where}: YAML nested too deeply to read; a config needs a few levels") from None


def apply_overrides(raw: dict[str, Any], items: list[str]) -> None:
    """Apply `--set` items given by the user; a key the schema lacks is blamed on its --set,
    not on the config file it would otherwise be found in."""
    for item in items:
        check_key(item.partition("=")[0])
        apply_override(raw, item)


def check_key(key: str, flag: str = "--set") -> None:
    """Walk a dotted key down the schema's sections; past a leaf (a list, a mapping) the type
    check takes over. A key that is not there is blamed on the `flag` that gave it."""
    section: Any = Config
    parts = key.split(".") if key else []  # no key at all: apply_override says KEY=VALUE
    for depth, part in enumerate(parts):
        fields = typing.get_type_hints(section)
        if part not in fields:
            prefix = "".join(f"{p}." for p in parts[:depth])
            close = difflib.get_close_matches(key[:200], schema_keys(Config), n=1, cutoff=0.6)
            fix = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(prefix + n for n in fields)}"
            raise FinetuneError(f"{flag} {_key_text(key)}: no such key; {fix}")
        section = _section(fields[part])
        if section is None:
            return


def _section(tp: Any) -> type | None:
    """The dataclass a key's value is built from (`Section` or `Section | None`), else None."""
    return tp if dataclasses.is_dataclass(tp) else _optional_dataclass(tp)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config section: its sections and, inside them, their keys."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        if _section(tp) is not None:
            keys += schema_keys(_section(tp), f"{prefix}{name}.")
    return keys


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict, the value parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise FinetuneError(f"--set {show(item)}: expected KEY=VALUE, e.g. --set train.epochs=2")
    try:
        value = _parse(text, f"--set {show(key)}") if text else None
    except yaml.YAMLError:
        raise FinetuneError(f"--set {show(key)}: value {show(text)} is not valid YAML; quote it") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # a section left empty (`train:`) holds defaults
            node[part] = {}
        if not isinstance(node[part], dict):
            raise FinetuneError(f"--set {show(key)}: {show(part)} is not a section")
        node = node[part]
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from a plain nested dict."""
    cfg = _build(Config, _one_unfreeze_form(raw, source), prefix="", source=source)
    validate(cfg)
    return cfg


def saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config saved by a run: runs from before `data.split_seed` drew their subsets with `seed`."""
    data = raw.setdefault("data", {})
    if isinstance(data, dict):
        data.setdefault("split_seed", raw.get("seed", DataConfig.split_seed))
    return raw


def _one_unfreeze_form(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` without the shorthand keys that are null but mean "not given", so that `--set
    train.freeze_backbone=null train.unfreeze_epoch=null train.unfreeze=[...]` turns any config
    into stages. Without stages `unfreeze_epoch: null` keeps its meaning: never unfreeze."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return raw
    staged = train.get("unfreeze") is not None
    unset = {key for key in SHORTHAND_KEYS if key in train and train[key] is None}
    unset = unset if staged else unset - {"unfreeze_epoch"}
    train = {key: value for key, value in train.items() if key not in unset}
    given = [f"train.{key}" for key in SHORTHAND_KEYS if key in train]
    if staged and given:
        raise FinetuneError(
            f"{source}: train.unfreeze (stages) and the shorthand {' / '.join(given)} both say when to unfreeze; "
            f"drop {' and '.join(given)} or set it to null (or drop train.unfreeze)"
        )
    return {**raw, "train": train}


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise FinetuneError(f"{source}: {prefix.rstrip('.')} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise FinetuneError(f"{source}: unknown key {prefix}{_key_text(key)}{_suggest(str(key), names, prefix)}")
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


def _key_text(key: Any) -> str:
    """A key as the message can print it on one line."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else show(key)


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
    close = difflib.get_close_matches(key[:100], names, n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise naming the key.

    PyYAML reads `3e-4` (no dot) as a string and `off` as false; where a number or the
    word is expected they are taken as meant.
    """
    options = (tp, *typing.get_args(tp))
    if float in options and isinstance(value, str) and FLOAT_PATTERN.match(value):
        value = float(value)
    if isinstance(value, bool) and typing.get_origin(tp) is Literal and ("off" if not value else "on") in tp.__args__:
        value = "on" if value else "off"
    if not _matches(value, tp):
        raise FinetuneError(f"{source}: {key} = {show(value)} is invalid; expected {_describe(tp)}")
    if float in options and int not in options and isinstance(value, int) and not isinstance(value, bool):
        return _as_float(value, key, source)
    return value


def _as_float(value: int, key: str, source: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise FinetuneError(f"{source}: {key} = {show(value)} is too large for a number") from None


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
