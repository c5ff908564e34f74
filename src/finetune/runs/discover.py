"""The runs `finetune compare` is given: run dirs found at any depth under the folders named
(a sweep's, a tune study's, a parent of several), each read with its config and summary."""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from finetune.config.schema import flatten
from finetune.errors import FinetuneError

OLD_PHASES = {"frozen": "head", "unfrozen": "backbone"}
RUN_FILES = ("config.yaml", "results.csv")  # what makes a folder a run dir


@dataclass
class Run:
    name: str  # its path under the folder it was found in, e.g. `tune-a/trial-0001`
    config: dict[str, Any]  # flattened: {"train.lr_head": 0.001, ...}
    results: pd.DataFrame
    summary: dict[str, Any]

    @property
    def finished(self) -> bool:
        return len(self.results) >= self.config["train.epochs"]

    @property
    def monitor(self) -> str:
        return self.config.get("checkpoint.monitor", "val_acc")

    @property
    def class_columns(self) -> list[str]:
        return [c for c in self.results.columns if c.startswith("val_acc_")]

    @property
    def n_val(self) -> int | None:
        """Validation images, from summary.json (runs written before it recorded them: None)."""
        return self.summary.get("val_size")


def note(text: str) -> None:
    """A remark on the runs, on stderr: stdout holds only the table (or `--json`)."""
    print(f"compare: {text}", file=sys.stderr)


def find_runs(patterns: list[str]) -> list[Run]:
    """Run dirs from paths or globs; a folder stands for every run below it, at any depth."""
    found: dict[Path, list[Path]] = {}  # run dir -> the folders it was found under
    for pattern in patterns:
        for root in [Path(p).absolute() for p in sorted(glob.glob(pattern)) or [pattern]]:
            for run_dir in run_dirs(root):
                found.setdefault(run_dir, []).append(root if run_dir != root else root.parent)
    names = _names({run_dir: roots[0] for run_dir, roots in found.items()})
    runs = [run for run_dir, name in names.items() if (run := load_run(run_dir, name)) is not None]
    if not runs:
        raise FinetuneError(f"compare: no runs with results in {' '.join(patterns)}; give run dirs or their parent")
    return runs


def run_dirs(root: Path) -> list[Path]:
    """`root` if it is a run, else the runs below it; a run's own folders (tensorboard/) are not
    searched. A folder with a config.yaml and no results.csv is a run before its first epoch
    (load_run names it) unless runs lie below it (a folder that keeps its config beside them)."""
    found, starting = [], []
    for folder, subfolders, files in os.walk(root):
        if all(name in files for name in RUN_FILES):
            found.append(Path(folder))
            subfolders.clear()
        elif RUN_FILES[0] in files:
            starting.append(Path(folder))
        subfolders.sort()
    return sorted(found + [s for s in starting if not any(s in run.parents for run in found)])


def _names(roots: dict[Path, Path]) -> dict[Path, str]:
    """Each run's path under the folder it was found in; where two runs would share a name (a
    trial-0001 in each of two studies), their paths under the folders' common parent."""
    names = {run_dir: run_dir.relative_to(root).as_posix() for run_dir, root in roots.items()}
    if len(set(names.values())) == len(names):
        return names
    common = Path(os.path.commonpath(list(roots.values())))
    return {run_dir: run_dir.relative_to(common).as_posix() for run_dir in roots}


def load_run(path: Path, name: str) -> Run | None:
    """The run, or None (with a note) while its results.csv holds no epoch."""
    try:
        results = pd.read_csv(path / "results.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        results = pd.DataFrame()
    if results.empty:
        note(f"skipping {name}: no epoch finished yet")
        return None
    if "phase" in results:  # runs written before stages: frozen/unfrozen were head/backbone
        results = results.rename(columns={"phase": "stage"}).replace({"stage": OLD_PHASES})
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()))
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Run(name, config, results, summary)
