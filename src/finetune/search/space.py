"""The search space of `finetune tune`: YAML keyed by dotted config keys, each a range
(`{low, high, log}`) or a list of whole values (`{choices: [...]}`), checked against the config
before any trial trains.

Every bound and every choice is tried in the base config up front, so a key that does not
exist or a value the config check refuses is one line before the first epoch; each trial's
full config is checked again as it is sampled (a combination can still be refused).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.config.check import show
from finetune.config.load import apply_override, from_dict, read_yaml
from finetune.config.schema import Config
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    import optuna

PRIMITIVE = (str, int, float, bool, type(None))  # what Optuna stores as a categorical choice
FORMS = "{low: L, high: H} (optionally log: true) or {choices: [...]}"


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range (int when both bounds are ints), or choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def labels(self) -> list[Any]:
        """The choices as Optuna stores them: whole values (stage lists, blocks) as YAML text."""
        return [label(c) for c in self.choices or ()]

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value for this key, drawn by the study's sampler."""
        if self.choices is not None:
            return self.value(trial.suggest_categorical(self.key, self.labels))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def value(self, stored: Any) -> Any:
        """The config value of what the storage holds for this key (a choice's label -> its value)."""
        if self.choices is None:
            return stored
        return self.choices[self.labels.index(stored)]

    def extremes(self) -> list[Any]:
        """The values to try up front: both bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def label(value: Any) -> Any:
    return value if isinstance(value, PRIMITIVE) else yaml.safe_dump(value, default_flow_style=True).strip()


def load_space(path: Path) -> list[Param]:
    raw = read_yaml(path)
    if not raw:
        raise FinetuneError(f"space {path}: no keys; give dotted config keys, e.g. train.lr_backbone: {FORMS}")
    return [_param(path, str(key), spec) for key, spec in raw.items()]


def _param(path: Path, key: str, spec: Any) -> Param:
    where = f"space {path}: {key}"
    if not isinstance(spec, dict) or not spec:
        raise FinetuneError(f"{where} = {show(spec)}: expected {FORMS}")
    if "choices" in spec:
        return _choices(where, key, spec)
    unknown = set(spec) - {"low", "high", "log"}
    if unknown or not {"low", "high"} <= set(spec):
        raise FinetuneError(f"{where} has keys {', '.join(map(str, spec))}; expected {FORMS}")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    if not (_number(low) and _number(high)) or not isinstance(log, bool):
        raise FinetuneError(f"{where}: low {show(low)}, high {show(high)} must be numbers and log true or false")
    if not low < high:
        raise FinetuneError(f"{where}: low {low} must be below high {high}; for one value use --set {key}={low}")
    if log and low <= 0:
        raise FinetuneError(f"{where}: a log range needs low > 0 (got {low}); drop log or raise low")
    return Param(key, low, high, log)


def _choices(where: str, key: str, spec: dict[str, Any]) -> Param:
    choices = spec["choices"]
    if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
        raise FinetuneError(f"{where}: choices must be the only key and a non-empty list, got {show(spec)}")
    labels = [label(c) for c in choices]
    if len(set(map(repr, labels))) < len(labels):
        raise FinetuneError(f"{where}: choices {show(choices)} repeat a value; list each once")
    return Param(key, choices=tuple(choices))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_config(base: dict[str, Any], values: dict[str, Any], source: str) -> Config:
    """The base config (file + --set, as a raw dict) with the trial's values, checked."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True)}")
    return from_dict(raw, source=source)


def check_space(params: list[Param], base: dict[str, Any], space: Path, source: str) -> None:
    """Each bound and each choice, alone in the base config: the key exists and the value passes."""
    for param in params:
        for value in param.extremes():
            try:
                trial_config(base, {param.key: value}, source)
            except FinetuneError as exc:
                raise FinetuneError(f"space {space}: {param.key} = {show(value)} is refused: {exc}") from None
