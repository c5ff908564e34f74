"""The parent MLflow run of a sweep or a tune study (`tracking.mlflow` in its config): the sweep
or study dir is its dir (mlflow.json, as a run dir's), its runs or trials are its children, in
its experiment. Rank 0 opens it; a server that does not answer stops every rank with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config.schema import MlflowConfig
from finetune.errors import FinetuneError
from finetune.inference.export import export_for_tracking
from finetune.runs.tracking import Link, Parent, Tracker, source_tags
from finetune.runtime.distributed import SINGLE, Ranks, from_main


def open_parent(
    settings: MlflowConfig | None, folder: Path, experiment: str, params: dict[str, Any], ranks: Ranks = SINGLE
) -> Tracker | None:
    """The dir's parent run on rank 0 (None elsewhere, or without tracking); `experiment`: its default name."""
    if settings is None:
        return None
    tracker, error = None, None
    if ranks.main:
        try:
            tracker = Tracker.open(settings, folder, experiment, params, source_tags(None))
        except FinetuneError as exc:
            error = str(exc)
    error = from_main(error, ranks)
    if error is not None:
        raise FinetuneError(error)
    return tracker


def child_link(parent: Tracker | None, tags: dict[str, str] | None = None) -> Link:
    """How a child run is tracked: under `parent`, with `tags` of its own (a trial's number and values)."""
    if parent is None:
        return Link(export=export_for_tracking)
    state = parent.state
    return Link(Parent(state.run_id, state.experiment_id, tags or {}), export=export_for_tracking)
