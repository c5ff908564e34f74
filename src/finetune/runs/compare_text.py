"""compare's tables as text: structured config values summarized (a stage list as
`layer4@1,backbone@3`, a scheduler as `cosine(warmup_epochs 0.5)`) and, on the terminal,
fitted to 160 columns. comparison.csv keeps every value whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

WIDTH = 160
# the columns (a name, or a prefix ending in _) the terminal leaves out first, in this order; the others always show
SPARE = (
    "monitor",
    "judged",
    "device",
    "s_per_epoch_",
    "final_val_balanced_acc",
    "final_val_map",
    "best_epoch",
    "best_stage",
    "n_val",
    "final_val_acc",
)
LABELS = ("run", "setting")  # the columns that name a row
LONGEST, SHORTEST = 28, 10  # characters of a name or config value on the terminal


def canonical(value: Any) -> str:
    """A value's text for telling values apart: mappings equal whatever their key order."""
    return json.dumps(value, sort_keys=True, default=str)


def summarize(values: list[Any]) -> list[str]:
    """One column of config values as short text: stage lists by stage, mappings by the fields
    that differ between the rows (all of them where only one mapping is there)."""
    mappings = [v for v in values if isinstance(v, dict)]
    keys = dict.fromkeys(k for m in mappings for k in m)
    fields = [k for k in keys if len({canonical(m.get(k)) for m in mappings}) > 1] or list(keys)
    return [_summary(v, fields) for v in values]


def _summary(value: Any, fields: list[str] | None = None) -> str:
    """`fields`: those of a mapping to show (None: all)."""
    if isinstance(value, dict):
        inner = " ".join(f"{k} {_inner(value.get(k))}" for k in (fields or list(value)) if k != "name")
        return f"{value['name']}({inner})" if "name" in value and inner else value.get("name", inner)
    if isinstance(value, list) and value and all(isinstance(v, dict) and "modules" in v for v in value):
        return ",".join(_stage(stage) for stage in value)
    if isinstance(value, list):
        return ",".join(_summary(v) for v in value)
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _inner(value: Any) -> str:
    """A value inside a mapping: a mapping there in parentheses, so its fields read as its own."""
    return f"({_summary(value)})" if isinstance(value, dict) else _summary(value)


def _stage(stage: dict[str, Any]) -> str:
    """`layer4@1`: the stage's name and the epoch after which it joins (or `plateau`)."""
    name = stage.get("name") or "+".join(stage["modules"])
    when = "plateau" if stage.get("after") == "plateau" else stage.get("epoch") or 0
    return f"{name}@{when}"


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its JSON cells (stage lists, mappings) summarized, empty cells as None."""
    cells = table.astype(object).where(table.notna(), None)
    for column in cells.columns:
        parsed = [_parsed(v) for v in cells[column]]
        if any(isinstance(v, (list, dict)) for v in parsed):
            cells[column] = summarize(parsed)
    return cells


def _parsed(cell: Any) -> Any:
    if isinstance(cell, str) and cell[:1] in "[{":
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def full_markdown(table: pd.DataFrame) -> str:
    """Every column, summarized: comparison.md and seeds.md."""
    return _markdown(readable(table))


def _markdown(cells: pd.DataFrame) -> str:
    """Empty cells (a stage a run never had) as `-`."""
    cells = cells.astype(object)
    return cells.where(cells.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="-")


@dataclass
class Fitted:
    text: str
    left_out: list[str]  # columns dropped to fit the width


def fit(table: pd.DataFrame, width: int = WIDTH) -> Fitted:
    """The table as markdown no wider than `width`: long names and config values shortened in
    the middle, then the spare columns and, from the right, config keys left out as needed."""
    cells = readable(table)
    tried = Fitted("", [])
    for dropped, cap in _tries(cells):
        tried = Fitted(_markdown(_shortened(cells.drop(columns=dropped), cap)), dropped)
        if max(map(len, tried.text.splitlines())) <= width:
            break
    return tried


def markdown(table: pd.DataFrame) -> str:
    """The table as a terminal shows it, within 160 columns."""
    return fit(table).text


def _tries(cells: pd.DataFrame) -> Iterator[tuple[list[str], int]]:
    """(columns to leave out, cap on names and values): the spare columns go first, a group at a
    time (every s_per_epoch_ column together), then values are cut shorter, then keys go."""
    spare: list[str] = []
    yield [], LONGEST
    for prefix in SPARE:
        spare += [c for c in cells.columns if c == prefix or (prefix.endswith("_") and c.startswith(prefix))]
        yield list(spare), LONGEST
    for cap in range(LONGEST - 1, SHORTEST - 1, -1):
        yield spare, cap
    keys = [c for c in cells.columns if _is_key(c)][::-1]
    for n in range(1, len(keys) + 1):
        yield spare + keys[:n], SHORTEST


def _is_key(column: str) -> bool:
    return "." in column or column == "seed"


def _shortened(cells: pd.DataFrame, cap: int) -> pd.DataFrame:
    """Names and config values cut to `cap` characters; a key is headed by its last part where no
    other column shares it."""
    texts = [c for c in cells.columns if c in LABELS or _is_key(c)]
    short = {c: c.rsplit(".", 1)[-1] for c in texts}
    taken = [short.get(c, c) for c in cells.columns]
    headers = {c: short[c] if taken.count(short[c]) == 1 else c for c in texts}
    cut = cells.assign(**{c: cells[c].map(lambda v: cut_middle(str(v), cap), na_action="ignore") for c in texts})
    return cut.rename(columns=headers)


def cut_middle(text: str, cap: int) -> str:
    """`text` at most `cap` long, its middle given up: both the start and end of a name tell runs apart."""
    if len(text) <= cap:
        return text
    head = (cap - 1) // 2 + (cap - 1) % 2
    return text[:head] + "…" + text[len(text) - (cap - 1 - head) :]
