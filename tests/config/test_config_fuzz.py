"""Seeded fuzzing of the shipped configs: a mutated config is planned, or refused in one line.

Each case mutates one to three keys (or whole sections) of a configs/*.yaml: wrong types,
non-finite, huge and negative numbers, strings where numbers go, lists where scalars go,
broken and deeply nested blocks, misspelled and dropped keys, and every bounded number at
its limits. The config check and `make_plan` must then either pass or raise a one-line
FinetuneError within seconds; any other exception, or a case still running after
CASE_SECONDS, is a bug.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.config.check import RANGES, leaves
from finetune.config.load import load_config
from finetune.errors import FinetuneError
from finetune.plan import make_plan

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
CASES_PER_CONFIG = 20
CASE_SECONDS = 30.0  # generous: the suite shares two busy cores
RAW = "RAW_YAML_TEXT"  # stands for YAML text that yaml.safe_dump would not write (deep nesting, .inf)


def deep(rng: random.Random) -> str:
    depth = rng.choice([40, 3000, 100_000])
    return rng.choice(["[" * depth + "]" * depth, "{a: " * depth + "1" + "}" * depth])


VALUES = [
    "three",
    "a\x00b",
    "",
    "1e5",
    "nan",
    [1, 2],
    [],
    {"a": 1},
    {"epochs": "x"},
    True,
    None,
    float("inf"),
    float("-inf"),
    float("nan"),
    -1,
    -0.5,
    0,
    1e300,
    1e-300,
    -(10**12),
    *(10**k for k in (5, 9, 12, 30, 400)),
]
RAW_VALUES = [".inf", "-.inf", ".nan", "1e999", "[[[]]]", "{x: {y: {z: [1, .nan]}}}"]


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a loaded config, sections and list items included."""
    found = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found += paths(value, (*prefix, key))
    return found


def schema_paths() -> list[tuple]:
    """The bounded keys a shipped config may leave out: list items need a list to be in."""
    return [tuple(key.split(".")) for key in RANGES if "[]" not in key]


def limit(path: tuple) -> list[Any]:
    """A bounded key's own limits, and just past them."""
    key = ".".join(str(p) if not isinstance(p, int) else "[]" for p in path).replace(".[]", "[]")
    bound = RANGES.get(key)
    if bound is None:
        return []
    step = 1 if isinstance(bound.high, int) else 1e-9
    return [bound.low, bound.high, bound.low - step, bound.high + step, 10**400]


def put(raw: dict, path: tuple, value: Any) -> None:
    node = raw
    for part in path[:-1]:
        if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def mutate(raw: dict, rng: random.Random) -> tuple[dict, list[str], str]:
    """(mutated dict, what was done, raw YAML text to put where RAW stands)."""
    done, text = [], rng.choice([*RAW_VALUES, deep(rng)])
    wanted = rng.randint(1, 3)
    while len(done) < wanted:
        path = rng.choice(paths(raw) + schema_paths())
        kind = rng.choice(["value", "value", "raw", "limit", "misspell", "drop"])
        value = rng.choice(limit(path) or VALUES) if kind == "limit" else rng.choice(VALUES)
        if kind == "raw":
            value = RAW
        try:
            if kind == "drop":
                del _parent(raw, path)[path[-1]]
            elif kind == "misspell":
                put(raw, (*path[:-1], f"{path[-1]}x"), 1)
            else:
                put(raw, path, copy.deepcopy(value))  # VALUES stay as they are
        except (TypeError, IndexError, KeyError):
            continue  # the path went away under an earlier mutation
        done.append(f"{kind} {'.'.join(map(str, path))}" + (f"={value!r}"[:60] if kind in ("value", "limit") else ""))
    return raw, done, text


def _parent(raw: dict, path: tuple) -> Any:
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


def floats(cfg: object) -> list[float]:
    return [value for _, _, value in leaves(cfg) if isinstance(value, float)]


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in the block after `seconds`, so a plan that would run for hours fails the case."""

    def expire(*_args: object) -> None:
        raise TimeoutError(f"still running after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_mutated_configs_plan_or_fail_in_one_line_quickly(config, tmp_path):
    rng = random.Random(f"issue-15-{config.stem}")
    bugs = []
    for case in range(CASES_PER_CONFIG):
        raw, done, text = mutate(yaml.safe_load(config.read_text()), rng)
        path = tmp_path / f"case{case}.yaml"
        path.write_text(yaml.safe_dump(raw).replace(RAW, text))
        try:
            with deadline(CASE_SECONDS):
                cfg = load_config(path)
                plan = make_plan(cfg)
            lrs = [lr for epoch in plan.epochs for lr in (*epoch.lr_start.values(), *epoch.lr_end.values())]
            if not all(math.isfinite(x) for x in [*floats(cfg), *lrs]):
                bugs.append(f"case {case} {done}: accepted, with a number that is not finite")
        except FinetuneError as exc:
            if "\n" in str(exc) or len(str(exc)) > 500:
                bugs.append(f"case {case} {done}: not one short line: {str(exc)[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - any other exception is what the fuzzing looks for
            bugs.append(f"case {case} {done}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not bugs, "\n".join(bugs)


LARGEST = [
    f"train.epochs={RANGES['train.epochs'].high}",
    f"data.train_size={RANGES['data.train_size'].high}",
    f"data.val_size={RANGES['data.val_size'].high}",
    "data.batch_size=1",  # the most steps
    f"train.early_stopping.patience={RANGES['train.early_stopping.patience'].high}",
    f"train.scheduler.warmup_epochs={RANGES['train.epochs'].high - 1}",
    f"train.unfreeze_warmup_epochs={RANGES['train.unfreeze_warmup_epochs'].high}",
    "train.scheduler.name=step",
    "train.scheduler.step_epochs=1e-9",
]


def test_the_largest_schedule_a_staged_config_may_hold_plans_quickly():
    with deadline(CASE_SECONDS):
        plan = make_plan(load_config(Path(__file__).parents[2] / "configs" / "gradual_unfreeze.yaml", LARGEST))
    assert len(plan.epochs) == RANGES["train.epochs"].high
