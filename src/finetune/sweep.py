"""`finetune sweep`: many short runs in one process, each written exactly as `finetune train`
writes it, then compared.

Runs go one after another through one Session, so data is decoded once per data config,
weights are read once, head-input caches stay in memory, and torch starts once. Rerunning
the same command skips finished runs and resumes an interrupted one.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from finetune.config import Config, load_config
from finetune.errors import FinetuneError, Interrupted
from finetune.rundir import config_changes, remove_stale_temp_files, saved_run_config


@dataclass
class SweepRun:
    name: str  # its run dir under the sweep dir: what varies, e.g. `lr_backbone=1e-05,seed=1`
    cfg: Config


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`KEY=V1,V2` -> (KEY, [V1, V2]); each value is parsed as YAML, as `--set` does."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise FinetuneError(f"--grid {item!r}: expected KEY=V1,V2, e.g. --grid train.lr_backbone=1e-4,1e-5")
        grid.append((key, values.split(",")))
    return grid


def expand(configs: list[str], overrides: list[str], grid: list[str], seeds: list[int] | None) -> list[SweepRun]:
    """Every config x every grid combination x every seed, each validated now (a typo in the
    tenth run is reported before the first one trains)."""
    axes = parse_grid(grid)
    runs = []
    for path in configs:
        for values in itertools.product(*(v for _, v in axes)):
            for seed in seeds or [None]:
                sets = [f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)]
                sets += [] if seed is None else [f"seed={seed}"]
                parts = ([Path(path).stem] if len(configs) > 1 else []) + [_label(s) for s in sets]
                name = ",".join(parts) or Path(path).stem
                runs.append(SweepRun(name, load_config(path, [*overrides, *sets, f"name={name}"])))
    if len({r.name for r in runs}) < len(runs):
        raise FinetuneError("sweep: two runs would share a run dir; give configs with different file names")
    return runs


def _label(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}".replace("/", "_")


def default_out(configs: list[str], runs: list[SweepRun]) -> Path:
    """`<out_dir>/sweep-<config>[-<config>...]`: the same command finds the same dir again."""
    return Path(runs[0].cfg.out_dir) / ("sweep-" + "-".join(Path(c).stem for c in configs))


def run_sweep(runs: list[SweepRun], out: Path) -> list[Path]:
    """Train each run not finished yet; return every run dir."""
    from finetune.session import Session

    session = Session()
    dirs = []
    for i, run in enumerate(runs, start=1):
        run_dir = out / run.name
        run.cfg.out_dir = str(out)  # one feature store for the sweep
        dirs.append(run_dir)
        state = _existing(run_dir, run.cfg)
        if state == "finished":
            print(f"[{i}/{len(runs)}] {run.name}: finished before, skipped")
            continue
        print(f"[{i}/{len(runs)}] {run.name}" + (": resuming" if state == "started" else ""))
        try:
            session.train(run.cfg, run_dir, resume=state == "started")
        except Interrupted as exc:
            exc.resume_hint = "rerun the same finetune sweep command"
            raise
    return dirs


def _existing(run_dir: Path, cfg: Config) -> str:
    """`new`, `started` (to resume) or `finished`, after checking the dir holds this very run."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "new"
    changed = config_changes(saved_run_config(run_dir), cfg)
    if changed:
        raise FinetuneError(
            f"sweep: {run_dir} holds a run whose config differs in {', '.join(changed)}; "
            "rerun the sweep with its original settings, or give another --out"
        )
    remove_stale_temp_files(run_dir)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("stopped_early") or summary["epochs_completed"] >= cfg.train.epochs:
            return "finished"
    return "started"
