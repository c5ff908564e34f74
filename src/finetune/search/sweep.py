"""`finetune sweep`: many short runs in one process, each written exactly as `finetune train`
writes it, then compared.

Runs go one after another through one Session, so data is decoded once per data config,
weights are read once, head-input caches stay in memory, and torch starts once. Rerunning
the same command skips finished runs and resumes an interrupted one, by the rules of
`train --resume`. Each run is locked by the process that trains it, so several sweeps on one
dir (on one machine, or several sharing a filesystem) split the runs between them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from finetune.config.load import check_key, load_config
from finetune.config.schema import Config
from finetune.errors import FinetuneError, Interrupted
from finetune.runs.lock import RunLock, claim
from finetune.runs.rundir import check_continuation, is_finished, saved_run_config
from finetune.runs.tracking import Link
from finetune.search.parents import child_link, open_parent

if TYPE_CHECKING:
    import pandas as pd

    from finetune.training.session import Session


@dataclass
class SweepRun:
    name: str  # its run dir under the sweep dir: what varies, e.g. `lr_backbone=1e-05,seed=1`
    cfg: Config


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` -> (KEY, [V1, V2]), split on top-level commas by reading the values as a YAML
    flow list, so `[0,1],[2,3]` is two values; each keeps its text, parsed later as `--set` does."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise FinetuneError(f"--grid {item!r}: expected KEY=V1,V2, e.g. --grid train.lr_backbone=1e-4,1e-5")
        grid.append((key, _split_values(key, values)))
    return grid


def _split_values(key: str, values: str) -> list[str]:
    try:
        node = yaml.compose(f"[{values}]")
    except yaml.YAMLError:
        raise FinetuneError(
            f"--grid {key}: {values!r} is not a comma-separated list of YAML values; quote them"
        ) from None
    texts = [values[n.start_mark.index - 1 : n.end_mark.index - 1] for n in node.value]
    if not texts:
        raise FinetuneError(f"--grid {key}: no values; expected KEY=V1,V2")
    return texts


def expand(configs: list[str], overrides: list[str], grid: list[str], seeds: list[int] | None) -> list[SweepRun]:
    """Every config x every grid combination x every seed, each validated now (a typo in the
    tenth run is reported before the first one trains)."""
    axes = parse_grid(grid)
    for key, _ in axes:
        check_key(key, "--grid")
    runs = []
    for path in configs:
        for values in itertools.product(*(v for _, v in axes)):
            for seed in seeds or [None]:
                sets = [f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)]
                labels = [_label(k, v, options.index(v)) for (k, options), v in zip(axes, values, strict=True)]
                if seed is not None:
                    sets.append(f"seed={seed}")
                    labels.append(f"seed={seed}")
                name = ",".join(([Path(path).stem] if len(configs) > 1 else []) + labels) or Path(path).stem
                runs.append(SweepRun(name, load_config(path, [*overrides, *sets, f"name={json.dumps(name)}"])))
    if len({r.name for r in runs}) < len(runs):
        raise FinetuneError("sweep: two runs would share a run dir; give configs with different file names")
    return runs


def _label(key: str, value: str, index: int) -> str:
    """`lr_backbone=1e-05` in a run's name; a long or spaced block (a stage list, a scheduler) is
    named by its place in the grid, `unfreeze#2`, since its text would make a poor folder name."""
    short = key.rsplit(".", 1)[-1]
    if len(value) <= 40 and not re.search(r"[\s{}]", value):
        return f"{short}={value}".replace("/", "_")
    return f"{short}#{index + 1}"


def default_out(configs: list[str], runs: list[SweepRun]) -> Path:
    """`<out_dir>/sweep-<config>[-<config>...]`: the same command finds the same dir again."""
    return Path(runs[0].cfg.out_dir) / ("sweep-" + "-".join(Path(c).stem for c in configs))


def run_sweep(runs: list[SweepRun], out: Path) -> list[SweepRun]:
    """Train each run that is not finished and that no other process holds; return the runs
    still held elsewhere. Runs held elsewhere are looked at again, without waiting, until a
    pass takes none: a holder that died leaves its run to be resumed here, and the last look
    comes after this process let go of its last run, so of several sweeps on one dir, the one
    that finishes the last run sees every run finished. With `tracking.mlflow` the sweep is a
    parent MLflow run, FINISHED once every run is."""
    from finetune.training.session import Session

    session = Session()
    labels = {run.name: f"[{i}/{len(runs)}] {run.name}" for i, run in enumerate(runs, start=1)}
    parent = open_parent(runs[0].cfg.tracking.mlflow, out, out.name, {"runs": len(runs)})
    link, todo = child_link(parent), runs
    try:
        while True:
            held = [run for run in todo if not _take(session, run, out, labels[run.name], link)]
            if len(held) == len(todo):
                break
            todo = held
    except Interrupted:
        if parent:
            parent.end("KILLED")
        raise
    if parent and not held:
        parent.end("FINISHED")
    return held


def _take(session: Session, run: SweepRun, out: Path, label: str, link: Link) -> bool:
    """Train `run` unless it is finished; False when another process holds it. A finished run is
    recognised without its lock, so looking never makes a run look held to another sweep."""
    run_dir = out / run.name
    run.cfg.out_dir = str(out)  # one feature store for the sweep
    if not _finished(run_dir, run.cfg):
        lock = claim(run_dir)
        if lock is None:
            print(f"{label}: held by {RunLock(run_dir).holder() or 'another process'}, skipped")
            return False
        with lock:
            if not _finished(run_dir, run.cfg):  # its holder may have finished it just before
                _train(session, run, run_dir, label, link)
                return True
    print(f"{label}: finished before, skipped")
    return True


def _train(session: Session, run: SweepRun, run_dir: Path, label: str, link: Link | None = None) -> None:
    resume = (run_dir / "config.yaml").is_file()
    print(label + (": resuming" if resume else ""))
    try:
        session.train(run.cfg, run_dir, resume=resume, link=link)
    except Interrupted as exc:
        exc.resume_hint = "rerun the same finetune sweep command"
        raise


def _finished(run_dir: Path, cfg: Config) -> bool:
    """Whether `run_dir` holds this very run, finished, by the rules of `train --resume`."""
    if not (run_dir / "config.yaml").is_file():
        return False
    fix = "rerun the sweep with its original settings, or give another --out"
    check_continuation(saved_run_config(run_dir), cfg, f"sweep: {run_dir}", fix)
    summary_file = run_dir / "summary.json"
    return summary_file.is_file() and is_finished(json.loads(summary_file.read_text()), cfg.train.epochs)


def write_comparison(runs: list[SweepRun], out: Path) -> pd.DataFrame | None:
    """compare's table and plots in `<out>/comparison`; None when another sweep process that also
    saw every run finished is writing the same files right now."""
    from finetune.runs.compare import compare

    lock = claim(out / "comparison")
    if lock is None:
        return None
    with lock:
        return compare([str(out / run.name) for run in runs], out / "comparison").table
