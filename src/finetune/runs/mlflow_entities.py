"""What a run's epoch and its end are as MLflow entities: metrics at step = epoch, stamped and
rounded so an epoch sent twice is the same point, and the tags that say a stage, the runtime
choice and how the run ended."""

from __future__ import annotations

import numbers
import re
from typing import Any


def epoch_batch(
    row: dict[str, Any], previous: dict[str, Any] | None, summary: dict[str, Any] | None, stamps: dict[str, int]
) -> dict[str, Any]:
    """An epoch's metrics at step = epoch and, when a stage starts with it, a tag saying so."""
    from mlflow.entities import Metric, RunTag

    epoch, stamp = int(row["epoch"]), stamps[str(row["epoch"])]
    values = {k: _value(v) for k, v in row.items() if k != "epoch"}
    metrics = [Metric(_key(k), v, stamp, epoch) for k, v in values.items() if v is not None]
    tags = {"stage": str(row["stage"])}
    if previous is None or previous["stage"] != row["stage"]:
        tags[_key(f"stage_start.{row['stage']}")] = f"epoch {epoch}"
    tags.update(_runtime_tags(summary))
    return {"metrics": metrics, "tags": [RunTag(k, v) for k, v in tags.items()]}


def _runtime_tags(summary: dict[str, Any] | None) -> dict[str, str]:
    """The runtime choice (device, precision, layout, compile, and what decided it)."""
    if not summary:
        return {}
    runtime = summary.get("runtime") or {}
    keys = ("precision", "memory_format", "compile", "decided_by")
    return {"runtime.device": str(summary.get("device")), **{f"runtime.{k}": str(runtime.get(k)) for k in keys}}


def end_tags(summary: dict[str, Any]) -> dict[str, str]:
    """How a run ended: pruned (a tune trial), stopped early, or complete; and its best epoch."""
    if summary.get("pruned"):
        state = "pruned"
    elif summary.get("stopped_early"):
        state = "stopped_early"
    else:
        state = "complete"
    return {"state": state, "best_epoch": str(summary.get("best_epoch"))}


def _value(value: Any) -> float | None:
    """A metric's value as results.csv holds it (floats to 6 digits), whether read from memory or
    the file; None for text, flags and empty cells."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or value != value:
        return None
    return float(value) if isinstance(value, numbers.Integral) else float(f"{float(value):.6g}")


def _key(name: str) -> str:
    """A name MLflow takes as a key: letters, digits and _-. /: stay, anything else becomes _."""
    return re.sub(r"[^\w\-. /:]", "_", name)
