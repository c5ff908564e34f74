"""`finetune compare`: which run balanced speed and accuracy best, as tables and plots.

The config keys that differ between the runs are found from each run's config.yaml, so
the table shows `train.unfreeze_epoch` or `train.lr_backbone` without being told.
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure

from finetune.config.schema import flatten
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text

IGNORED_KEYS = {"name", "out_dir"}
OLD_PHASES = {"frozen": "head", "unfrozen": "backbone"}
REPEAT_KEYS = ("seed", "data.fold")  # repeats of one setting: seeds.csv gives their mean and std


@dataclass
class Run:
    name: str
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


def note(text: str) -> None:
    """A remark on the runs, on stderr: stdout holds only the table (or `--json`)."""
    print(f"compare: {text}", file=sys.stderr)


def find_runs(patterns: list[str]) -> list[Run]:
    """Run dirs from paths or globs; a folder of runs stands for every run inside it."""
    dirs: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
        for path in matches:
            if (path / "config.yaml").is_file():
                dirs.append(path)
            elif path.is_dir():
                dirs += sorted(p.parent for p in path.glob("*/config.yaml"))
    runs = [load_run(d) for d in dict.fromkeys(dirs)]
    runs = [r for r in runs if r is not None]
    if not runs:
        raise FinetuneError(f"compare: no runs with results in {' '.join(patterns)}; give run dirs or their parent")
    return runs


def load_run(path: Path) -> Run | None:
    results_file = path / "results.csv"
    if not results_file.is_file():
        note(f"skipping {path}: no epoch finished yet")
        return None
    config = flatten(yaml.safe_load((path / "config.yaml").read_text()))
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    results = pd.read_csv(results_file)
    if "phase" in results:  # runs written before stages: frozen/unfrozen were head/backbone
        results = results.rename(columns={"phase": "stage"}).replace({"stage": OLD_PHASES})
    return Run(path.name, config, results, summary)


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS)
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def _stage_seconds(results: pd.DataFrame) -> dict[str, float]:
    """Mean seconds per epoch of each stage, as `s_per_epoch_<stage>` columns."""
    means = results.groupby("stage", sort=False)["epoch_seconds"].mean()
    return {f"s_per_epoch_{stage}": float(value) for stage, value in means.items()}


def _best_row(run: Run) -> pd.Series:
    """The epoch the run's own `checkpoint.monitor` chose for best.pt."""
    column = run.results[run.monitor]
    return run.results.loc[column.idxmin() if run.monitor == "val_loss" else column.idxmax()]


def _epochs_cell(run: Run) -> str:
    done = f"{len(run.results)}/{run.config['train.epochs']}"
    if run.summary.get("stopped_early"):
        return f"{done} (early stop)"
    if run.summary.get("pruned"):
        return f"{done} (pruned)"
    return done + ("" if run.finished else " (stopped)")


def comparison_table(runs: list[Run], sort: str = "best_val_acc") -> pd.DataFrame:
    keys = differing_keys(runs)
    rows = []
    for run in runs:
        r = run.results
        best = _best_row(run)
        row = {"run": run.name, **{k: _cell(run.config.get(k)) for k in keys}}
        row.update(
            {
                "final_val_acc": r["val_acc"].iloc[-1],
                "best_val_acc": best["val_acc"],
                "final_val_balanced_acc": r["val_balanced_acc"].iloc[-1],
                "monitor": run.monitor,
                "best_epoch": int(best["epoch"]),
                **_stage_seconds(r),
                "total_s": float(r["epoch_seconds"].sum()),
                "epochs": _epochs_cell(run),
                "device": f"{run.summary.get('device', '?')} {run.summary.get('precision', '?')}",
            }
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if sort not in table.columns:
        raise FinetuneError(f"compare --sort {sort}: not a column; use one of {', '.join(table.columns)}")
    ascending = sort in ("run", "total_s") or sort.startswith("s_per_epoch_") or sort in keys
    return table.sort_values(sort, ascending=ascending, kind="stable").reset_index(drop=True)


def _cell(value: Any) -> Any:
    """Lists and null as text, so a column reads `null` rather than NaN."""
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else value


def seed_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame | None:
    """Mean and std over seeds and cross-validation folds for runs that differ only in those;
    None if no setting repeats. `over` says which of them vary."""
    repeats = [k for k in REPEAT_KEYS if k in keys]
    if not repeats:
        return None
    settings = [k for k in keys if k not in REPEAT_KEYS]
    label = (
        table[settings]
        .astype(str)
        .apply(lambda row: ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row.items()) or "all", axis=1)
    )
    grouped = table.assign(setting=label if settings else "all").groupby("setting", sort=False)
    if grouped.size().max() < 2:
        return None
    metrics = ["best_val_acc", "final_val_acc", "total_s"]
    stats = {f"{m}{suffix}": (m, how) for m in metrics for suffix, how in (("", "mean"), ("_std", "std"))}
    summary = grouped.agg(runs=("run", "count"), **stats).reset_index()
    summary.insert(2, "over", "+".join(k.rsplit(".", 1)[-1] for k in repeats))
    return summary


def pareto_front(points: pd.DataFrame) -> list[int]:
    """Positions of the points no other point beats on both accuracy and time."""
    acc, seconds = points["best_val_acc"].to_numpy(), points["total_s"].to_numpy()
    return [
        i
        for i in range(len(points))
        if not ((acc >= acc[i]) & (seconds <= seconds[i]) & ((acc > acc[i]) | (seconds < seconds[i]))).any()
    ]


def plot_tradeoff(points: pd.DataFrame, label: str) -> Figure:
    """Best val accuracy against training time, one point per run (or per setting, with error
    bars over seeds or folds); the best trade-offs, which no other point beats on both axes, circled
    and labelled in bold."""
    fig = Figure(figsize=(8, 5.5), layout="tight")
    ax = fig.subplots()
    x, y = points["total_s"], points["best_val_acc"]
    ax.errorbar(x, y, xerr=points.get("total_s_std"), yerr=points.get("best_val_acc_std"), fmt="o", alpha=0.6)
    front = pareto_front(points)
    ax.scatter(x.iloc[front], y.iloc[front], s=120, facecolors="none", edgecolors="crimson", label="best trade-offs")
    for i in range(len(points)):
        style = {"fontweight": "bold"} if i in front else {"color": "gray", "fontsize": "small"}
        ax.annotate(
            str(points[label].iloc[i]), (x.iloc[i], y.iloc[i]), textcoords="offset points", xytext=(6, 6), **style
        )
    ax.set(title="Accuracy against training time", xlabel="training seconds", ylabel="best val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def common_classes(runs: list[Run]) -> list[str]:
    """Per-class columns every run has, in the first run's order."""
    shared = set.intersection(*(set(r.class_columns) for r in runs))
    return [c for c in runs[0].class_columns if c in shared]


def per_class_table(runs: list[Run]) -> pd.DataFrame:
    columns = common_classes(runs)
    table = pd.DataFrame({r.name: r.results[columns].iloc[-1].to_numpy() for r in runs}, index=columns)
    table.index = [c.removeprefix("val_acc_") for c in columns]
    table.index.name = "class"
    return table


def plot_curves(runs: list[Run]) -> Figure:
    """Val accuracy and loss per epoch, one line per run, each new stage (unfreeze) marked."""
    fig = Figure(figsize=(12, 4.5), layout="tight")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for run in runs:
        r = run.results
        (line,) = acc_ax.plot(r["epoch"], r["val_acc"], marker="o", label=run.name)
        loss_ax.plot(r["epoch"], r["val_loss"], marker="o", color=line.get_color(), label=run.name)
        for epoch in r.loc[r["stage"].ne(r["stage"].shift()), "epoch"].iloc[1:]:
            for ax in (acc_ax, loss_ax):
                ax.axvline(epoch - 0.5, color=line.get_color(), linestyle=":", alpha=0.7)
    for ax, title in ((acc_ax, "Validation accuracy"), (loss_ax, "Validation loss")):
        ax.set(title=title, xlabel="epoch", ylabel=title.split()[-1])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    acc_ax.legend(title="run (dotted: a stage starts)", fontsize="small")
    return fig


def plot_per_class(table: pd.DataFrame) -> Figure:
    """Grouped bars: final accuracy per class, one bar per run."""
    fig = Figure(figsize=(max(8, 0.9 * len(table) * max(1, len(table.columns) / 2)), 4.5), layout="tight")
    ax = fig.subplots()
    table.plot.bar(ax=ax, width=0.8, rot=30)
    ax.set(title="Final validation accuracy per class", xlabel="class", ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(title="run", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def markdown(table: pd.DataFrame) -> str:
    """The table as markdown, empty cells (a stage a run never had) shown as `-`."""
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="-")


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run
    seeds: pd.DataFrame | None  # one row per setting repeated over seeds or folds

    def to_json(self) -> dict[str, Any]:
        """Rows as records, empty cells as null: what `compare --json` prints."""
        return {"runs": _records(self.table), "seeds": None if self.seeds is None else _records(self.seeds)}


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records"))


def compare(patterns: list[str], out: Path, sort: str = "best_val_acc") -> Comparison:
    """Write comparison.csv/.md, per_class.csv, curves.png, per_class.png, tradeoff.png and, where
    seeds or folds repeat a setting, seeds.csv/.md (mean and std over them)."""
    runs = find_runs(patterns)
    for run in runs:
        if not run.finished:
            note(f"{run.name} finished {len(run.results)}/{run.config['train.epochs']} epochs; using those")
    if len({tuple(r.class_columns) for r in runs}) > 1:
        note("the runs have different classes; per-class results cover only the classes they share")
    table = comparison_table(runs, sort)
    seeds = seed_table(table, differing_keys(runs))
    per_class = per_class_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out / "comparison.md", markdown(table) + "\n")
    atomic_write_text(out / "per_class.csv", per_class.to_csv())
    if seeds is not None:
        atomic_write_text(out / "seeds.csv", seeds.to_csv(index=False))
        atomic_write_text(out / "seeds.md", markdown(seeds) + "\n")
    tradeoff = plot_tradeoff(table, "run") if seeds is None else plot_tradeoff(seeds, "setting")
    figures = {"curves.png": plot_curves(runs), "per_class.png": plot_per_class(per_class), "tradeoff.png": tradeoff}
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    return Comparison(table, seeds)
