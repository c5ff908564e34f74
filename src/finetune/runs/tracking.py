"""One MLflow run per run dir (or per sweep or study dir, a parent run): its id and what it was
sent are kept in the dir's mlflow.json, so a resume continues the same MLflow run and a server
that went away gets exactly the epochs it missed, at the next epoch or by `finetune track`.

An epoch goes out as one batch: its metrics at step = epoch, each stamped with a time chosen
once and kept in mlflow.json before the send, and its values rounded as results.csv writes
them; so an epoch sent again (a kill between the send and the note that it went) is the same
point, which the server keeps once.
"""

from __future__ import annotations

import fcntl
import json
import numbers
import os
import platform
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.config.schema import Config, MlflowConfig
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs.lock import hold
from finetune.runs.mlflow_server import Server, Unreachable, experiment_name, tracking_uri
from finetune.runs.rundir import is_finished, saved_run_config

STATE_FILE = "mlflow.json"
BATCH = 100  # params or tags per log_batch call: MLflow's limit
RUN_FILES = ("config.yaml", "results.csv", "summary.json", "best.pt")


@dataclass
class Parent:
    """The MLflow run a sweep's runs or a study's trials hang under, and tags for the child."""

    run_id: str
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Link:
    """What a command adds to a run's tracking: the parent run (a sweep's, a study's), tags of
    its own, and for `log_model` how to export best.pt (the commands hand it down from inference/)."""

    parent: Parent | None = None
    tags: dict[str, str] = field(default_factory=dict)
    export: Callable[[Path], list[Path]] | None = None


@dataclass
class SentState:
    """mlflow.json: which MLflow run this dir is, and what the server has of it."""

    uri: str
    experiment_id: str
    run_id: str
    params: bool = False  # the server has the params
    sent: list[int] = field(default_factory=list)  # epochs the server has
    stamps: dict[str, int] = field(default_factory=dict)  # epoch -> its points' time (ms), chosen before a send
    files: bool = False  # the run's files went up (once it ended)
    status: str = "RUNNING"  # the status last sent

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / STATE_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @staticmethod
    def load(folder: Path) -> SentState | None:
        path = folder / STATE_FILE
        return SentState(**json.loads(path.read_text())) if path.is_file() else None


class Tracker:
    """Sends one dir to its MLflow run. Opening it reaches the server or raises FinetuneError;
    later a failed send is a warning (once until the server answers again), never an error."""

    def __init__(self, server: Server, folder: Path, state: SentState):
        self.server, self.folder, self.state = server, Path(folder), state
        self.down = False

    @classmethod
    def open(
        cls,
        settings: MlflowConfig,
        folder: Path,
        experiment: str,
        params: dict[str, Any],
        tags: dict[str, str],
        parent: Parent | None = None,
    ) -> Tracker:
        """The dir's MLflow run (created, with params and tags, the first time), set RUNNING;
        `experiment`: the name when tracking.mlflow and the environment name none."""
        server = Server(tracking_uri(settings))
        folder.mkdir(parents=True, exist_ok=True)
        tags = {**tags, "finetune.dir": str(folder.resolve())}
        with _locked(folder):  # a sweep's processes share its dir: one parent run
            state = SentState.load(folder)
            try:
                if state is None or state.uri != server.uri:
                    state = _create(server, experiment_name(settings, experiment), folder.name, parent, tags)
                    state.save(folder)
                elif server.call("get_run", state.run_id).info.status != "RUNNING":  # and it answers at start
                    server.call("update_run", state.run_id, status="RUNNING")
                if not state.params:
                    _send_params(server, state.run_id, params)
                    state.params = True
            except Unreachable as exc:
                raise server.refused(str(exc)) from None
            state.status = "RUNNING"
            state.save(folder)
        return cls(server, folder, state)

    def epochs(self, rows: list[dict[str, Any]], summary: dict[str, Any] | None) -> None:
        """Send each epoch of `rows` the server lacks, in order; a server that does not answer
        leaves them for the next call."""
        by_epoch = {int(row["epoch"]): row for row in rows}
        pending = [epoch for epoch in by_epoch if epoch not in self.state.sent]
        if not pending:
            return
        for epoch in pending:
            self.state.stamps.setdefault(str(epoch), int(time.time() * 1000))
        self.state.save(self.folder)
        for epoch in pending:
            batch = _epoch_batch(by_epoch[epoch], by_epoch.get(epoch - 1), summary, self.state)
            if not self._try("log_batch", self.state.run_id, **batch):
                return
            self.state.sent.append(epoch)
            self.state.save(self.folder)
        if len(pending) > 1:
            print(f"mlflow: sent epochs {pending[0]}-{pending[-1]} to {self.server.uri}")

    def end(
        self,
        status: str,
        summary: dict[str, Any] | None = None,
        files: list[Path] = (),
        tags: dict[str, str] | None = None,
    ) -> bool:
        """The run's end: `files` up, the state of a finished run (and `tags`) as tags, `status` last;
        False when the server did not take all of it (`finetune track` sends the rest)."""
        if files and not self.state.files:
            for path in files:
                if not self._try("log_artifact", self.state.run_id, str(path)):
                    return False
            self.state.files = True
            self.state.save(self.folder)
        for key, value in {**(_end_tags(summary) if summary else {}), **(tags or {})}.items():
            if not self._try("set_tag", self.state.run_id, key, value):
                return False
        if not self._try("set_terminated", self.state.run_id, status=status):
            return False
        self.state.status = status
        self.state.save(self.folder)
        return True

    def _try(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """One call; a failure warns once per outage, and the next success says the server is back."""
        try:
            self.server.call(method, *args, **kwargs)
        except Unreachable as exc:
            if not self.down:
                warnings.warn(
                    f"mlflow: {self.server.uri} did not answer ({exc}); training goes on, and what it missed is "
                    f"sent once it answers (or by: finetune track {self.folder})",
                    stacklevel=2,
                )
            self.down = True
            return False
        if self.down:
            print(f"mlflow: {self.server.uri} answers again; sending what it missed")
            self.down = False
        return True


def open_run(cfg: Config, folder: Path, link: Link) -> Tracker:
    """The run dir's MLflow run, its params the resolved config; FinetuneError if the server does not answer."""
    params = flat_params(cfg.to_dict())
    return Tracker.open(cfg.tracking.mlflow or MlflowConfig(), folder, cfg.name, params, link.tags, link.parent)


def sync(tracker: Tracker, folder: Path, epochs: int, export: Callable[[Path], list[Path]] | None = None) -> bool:
    """Send what the server lacks of the run in `folder` as its files say it: its epochs, and once
    it is finished its files and FINISHED (else KILLED: it can be resumed); False if it did not answer."""
    tracker.epochs(read_rows(folder), _summary(folder))
    if tracker.down:
        return False
    summary = _summary(folder)
    if summary is None or not is_finished(summary, epochs):
        return tracker.end("KILLED")
    extra = _exported(folder, export) if export and not tracker.state.files else []
    return tracker.end("FINISHED", summary, run_files(folder, extra))


def _exported(folder: Path, export: Callable[[Path], list[Path]]) -> list[Path]:
    """The exported model's files, for log_model; none (and a warning) when it cannot be made."""
    if not (folder / "best.pt").is_file():
        warnings.warn(f"mlflow: log_model: {folder} keeps no best.pt (checkpoint.keep) to export", stacklevel=2)
        return []
    try:
        return export(folder)
    except FinetuneError as exc:
        warnings.warn(f"mlflow: log_model: the export failed ({exc}); the run's other files are logged", stacklevel=2)
        return []


def track_run(folder: Path, uri: str | None, experiment: str | None) -> str:
    """`finetune track RUN_DIR`: a run that is not training now, sent to its MLflow run (created
    the first time: a run trained before tracking was set) with what the server lacks."""
    if not (folder / "config.yaml").is_file():
        raise FinetuneError(f"track {folder}: no config.yaml there, so it holds no run")
    cfg = saved_run_config(folder)
    given = {k: v for k, v in (("uri", uri), ("experiment", experiment)) if v is not None}
    settings = replace(cfg.tracking.mlflow or MlflowConfig(), **given)
    with hold(folder, "track"):
        tracker = Tracker.open(settings, folder, cfg.name, flat_params(cfg.to_dict()), source_tags(None))
        before = len(tracker.state.sent)
        done = sync(tracker, folder, cfg.train.epochs)
    state = tracker.state
    sent = f"{len(state.sent) - before} epochs sent ({len(state.sent)} in all), status {state.status}"
    if not done:
        return f"track {folder}: {sent}; the server stopped answering: run finetune track again"
    return f"track {folder}: MLflow run {state.run_id} at {state.uri}: {sent}"


def read_rows(folder: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        return pd.read_csv(folder / "results.csv").to_dict("records")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return []


def _summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_files(folder: Path, extra: list[Path] = ()) -> list[Path]:
    """The files a finished run uploads: its config, results, summary and best.pt (if kept), its plots."""
    names = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    return names + sorted(folder.glob("*.png")) + list(extra)


def source_tags(config: str | Path | None) -> dict[str, str]:
    """Tags of where a run comes from: the machine, and the git commit of the config's folder, if any."""
    tags = {"host": platform.node()}
    if config is None:
        return tags
    try:
        found = subprocess.run(
            ["git", "-C", str(Path(config).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return tags
    if found.returncode == 0:
        tags["mlflow.source.git.commit"] = found.stdout.strip()
    return tags


def flat_params(raw: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}, every level down; a list stays one value."""
    flat: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def _create(server: Server, experiment: str, name: str, parent: Parent | None, tags: dict[str, str]) -> SentState:
    """A new MLflow run: a child in its parent's experiment, or one in `experiment` (by name)."""
    if parent is not None:
        experiment_id = parent.experiment_id
        tags = {**tags, **parent.tags, "mlflow.parentRunId": parent.run_id}
    else:
        experiment_id = server.experiment(experiment)
    run = server.call("create_run", experiment_id, tags={**tags, "mlflow.source.name": "finetune"}, run_name=name)
    return SentState(server.uri, experiment_id, run.info.run_id)


def _send_params(server: Server, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), BATCH):
        server.call("log_batch", run_id, params=items[start : start + BATCH])


def _epoch_batch(
    row: dict[str, Any], previous: dict[str, Any] | None, summary: dict[str, Any] | None, state: SentState
) -> dict[str, Any]:
    """An epoch's metrics at step = epoch and, when a stage starts with it, a tag saying so."""
    from mlflow.entities import Metric, RunTag

    epoch, stamp = int(row["epoch"]), state.stamps[str(row["epoch"])]
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


def _end_tags(summary: dict[str, Any]) -> dict[str, str]:
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


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
