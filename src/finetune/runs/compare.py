"""`finetune compare`: which run balanced speed and accuracy best, as tables and plots.

The config keys that differ between the runs are found from each run's config.yaml, so
the table shows `train.unfreeze_epoch` or `train.lr_backbone` without being told. Runs are
found by discover.py, their curves and per-class bars drawn by compare_plots.py, the tables
printed by compare_text.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from finetune.config.schema import CheckpointConfig
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs.compare_page import write_compare_page
from finetune.runs.compare_plots import LABEL, plot_curves, plot_per_class
from finetune.runs.compare_text import WIDTH, canonical, cut_middle, fit, full_markdown, summarize
from finetune.runs.compare_text import markdown as markdown  # what cli's sweep and tune print
from finetune.runs.discover import Run, find_runs, note
from finetune.runs.results import judge

if TYPE_CHECKING:
    from matplotlib.figure import Figure

IGNORED_KEYS = {"name", "out_dir"}
REPEAT_KEYS = ("seed", "data.fold")  # repeats of one setting: seeds.csv gives their mean and std
# the column runs are ranked by: the trade-off plot, its Pareto front, the tie note. The val_acc of
# the epoch checkpoint.judge judges, not of the best: a plateau run's best may be a head-only epoch
SCORE = "judged_val_acc"
# the time trade-offs are judged on: time as run (total_s) plus what the cached features a run
# reused cost the run that computed them, so a run is not crowned for its place in the queue
COST = "cold_s"
ASCENDING = ("run", "total_s", COST, "noise")  # --sort columns where less is better, with s_per_epoch_* and the keys


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS)
    return [k for k in keys if len({canonical(r.config.get(k)) for r in runs}) > 1]


def _stage_seconds(results: pd.DataFrame) -> dict[str, float]:
    """Mean seconds per epoch of each stage, as `s_per_epoch_<stage>` columns."""
    means = results.groupby("stage", sort=False)["epoch_seconds"].mean()
    return {f"s_per_epoch_{stage}": float(value) for stage, value in means.items()}


def _best_row(run: Run) -> pd.Series:
    """The epoch the run's own `checkpoint.monitor` chose for best.pt (the last, where it is never a number)."""
    return _picked(run, "best")[1]


def _judged(run: Run) -> tuple[float | None, pd.Series]:
    """The run's value by its checkpoint.judge (runs from before the key: the default) and that
    epoch's row (the last, where the monitor is never a number)."""
    return _picked(run, run.config.get("checkpoint.judge", CheckpointConfig.judge))


def _picked(run: Run, rule: str) -> tuple[float | None, pd.Series]:
    judged = judge(run.results.to_dict("records"), run.monitor, run.monitor != "val_loss", rule)
    if judged is None:
        return None, run.results.iloc[-1]
    return judged.value, run.results.loc[run.results["epoch"] == judged.epoch].iloc[0]


def _epochs_cell(run: Run) -> str:
    done = f"{len(run.results)}/{run.config['train.epochs']}"
    if run.summary.get("stopped_early"):
        return f"{done} (early stop)"
    if run.summary.get("pruned"):
        return f"{done} (pruned)"
    return done + ("" if run.finished else " (stopped)")


def comparison_table(runs: list[Run], sort: str = SCORE) -> pd.DataFrame:
    keys = differing_keys(runs)
    table = pd.DataFrame([_row(run, keys) for run in runs])
    table.insert(table.columns.get_loc(SCORE) + 1, "noise", noise(table[SCORE], pd.to_numeric(table["n_val"])))
    if sort not in table.columns:
        raise FinetuneError(f"compare --sort {sort}: not a column; use one of {', '.join(table.columns)}")
    ascending = sort in ASCENDING or sort.startswith("s_per_epoch_") or sort in keys
    return table.sort_values(sort, ascending=ascending, kind="stable").reset_index(drop=True)


def _row(run: Run, keys: list[str]) -> dict[str, Any]:
    r, best = run.results, _best_row(run)
    judged, judged_row = _judged(run)
    return {
        "run": run.name,
        **{k: _cell(run.config.get(k)) for k in keys},
        "final_val_acc": r["val_acc"].iloc[-1],
        "best_val_acc": best["val_acc"],
        SCORE: judged_row["val_acc"],
        "n_val": run.n_val,
        "final_val_balanced_acc": r["val_balanced_acc"].iloc[-1] if "val_balanced_acc" in r else None,
        "final_val_map": r["val_map"].iloc[-1] if "val_map" in r else None,  # multilabel runs
        "monitor": run.monitor,
        "judged": judged,
        "best_epoch": int(best["epoch"]),
        "best_stage": best["stage"],
        **_stage_seconds(r),
        "total_s": float(r["epoch_seconds"].sum()),
        COST: _cold_seconds(r),
        "epochs": _epochs_cell(run),
        "device": f"{run.summary.get('device', '?')} {run.summary.get('precision', '?')}",
    }


def _cold_seconds(results: pd.DataFrame) -> float:
    """Time as run plus what the cached features it reused cost (runs from before that was recorded: as run)."""
    reused = results["feature_seconds_reused"].sum() if "feature_seconds_reused" in results else 0.0
    return float(results["epoch_seconds"].sum() + reused)


def _cell(value: Any) -> Any:
    """Lists and null as text, so a column reads `null` rather than NaN."""
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else value


def noise(accuracy: pd.Series | float, n_val: pd.Series | float) -> pd.Series | float:
    """The binomial standard error of an accuracy measured on `n_val` images: how far another
    draw of as many validation images would move it, one time in three."""
    return np.sqrt(accuracy * (1 - accuracy) / n_val)


def noise_note(table: pd.DataFrame) -> str | None:
    """What one image and the binomial noise are worth at the top run's accuracy; None when the
    validation size is unknown."""
    top = table.dropna(subset=[SCORE, "n_val"]).nlargest(1, SCORE)
    if top.empty:
        return None
    a, n = float(top[SCORE].iloc[0]), int(top["n_val"].iloc[0])
    return (
        f"On {n} validation images one image is {1 / n:.4f} of accuracy, and at {a:.3f} the noise (the binomial "
        f"standard error) is ±{noise(a, n):.3f}: a smaller difference between runs is within the noise."
    )


def tie_note(table: pd.DataFrame) -> str | None:
    """Why the top two runs by SCORE should be called tied, when their gap is within the noise
    at their pooled accuracy; None when it is not, or the validation size is unknown."""
    top = table.dropna(subset=[SCORE]).nlargest(2, SCORE)
    if len(top) < 2 or top["n_val"].isna().any():
        return None
    (first, second), (a, b) = top["run"], top[SCORE]
    n = int(top["n_val"].min())
    gap, within = a - b, noise((a + b) / 2, n)
    if gap > within:
        return None
    images = round(gap * n)
    return (
        f"{first} and {second} differ by {gap:.3f} ({images} image{'' if images == 1 else 's'} of {n}), "
        f"within the validation noise (±{within:.3f}): treat them as tied"
    )


def settings(runs: list[Run]) -> dict[str, str] | None:
    """Each run's setting: its differing keys but seed and fold (`all` where only those differ);
    None when no seed or fold varies."""
    keys = differing_keys(runs)
    if not any(k in REPEAT_KEYS for k in keys):
        return None
    values = {k.rsplit(".", 1)[-1]: summarize([r.config.get(k) for r in runs]) for k in keys if k not in REPEAT_KEYS}
    return {run.name: ",".join(f"{k}={v[i]}" for k, v in values.items()) or "all" for i, run in enumerate(runs)}


def seed_table(table: pd.DataFrame, runs: list[Run]) -> pd.DataFrame | None:
    """Mean and std over seeds and cross-validation folds for runs that differ only in those;
    None if no setting repeats. `over` says which of them vary."""
    labels = settings(runs)
    if labels is None:
        return None
    grouped = table.assign(setting=table["run"].map(labels)).groupby("setting", sort=False)
    if grouped.size().max() < 2:
        return None
    metrics = dict.fromkeys([SCORE, "best_val_acc", "final_val_acc", "total_s", COST])
    stats = {f"{m}{suffix}": (m, how) for m in metrics for suffix, how in (("", "mean"), ("_std", "std"))}
    summary = grouped.agg(runs=("run", "count"), **stats).reset_index()
    repeats = [k.rsplit(".", 1)[-1] for k in REPEAT_KEYS if k in differing_keys(runs)]
    summary.insert(2, "over", "+".join(repeats))
    return summary


def curve_lines(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each line on curves.png: one run, or every run of a setting repeated over
    seeds or folds (named `<setting> (<n> runs)`)."""
    labels = settings(runs) or {run.name: run.name for run in runs}
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(labels[run.name], []).append(run)
    return {
        (f"{label} ({len(group)} runs)" if len(group) > 1 else group[0].name): group for label, group in groups.items()
    }


def pareto_front(points: pd.DataFrame, score: str = SCORE) -> list[int]:
    """Positions of the points no other point beats on both `score` and cold cost."""
    acc, seconds = points[score].to_numpy(), points[COST].to_numpy()
    return [
        i
        for i in range(len(points))
        if not ((acc >= acc[i]) & (seconds <= seconds[i]) & ((acc > acc[i]) | (seconds < seconds[i]))).any()
    ]


def plot_tradeoff(points: pd.DataFrame, label: str, score: str = SCORE) -> Figure:
    """`score` against the cold cost, one point per run (or per setting, with error bars over
    seeds or folds); the best trade-offs, which no other point beats on both axes, circled
    and labelled in bold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="tight")
    ax = fig.subplots()
    x, y = points[COST], points[score]
    ax.errorbar(x, y, xerr=points.get(f"{COST}_std"), yerr=points.get(f"{score}_std"), fmt="o", alpha=0.6)
    front = pareto_front(points, score)
    ax.scatter(x.iloc[front], y.iloc[front], s=120, facecolors="none", edgecolors="crimson", label="best trade-offs")
    for i in range(len(points)):
        style = {"fontweight": "bold"} if i in front else {"color": "gray", "fontsize": "small"}
        ax.annotate(
            cut_middle(str(points[label].iloc[i]), LABEL),
            (x.iloc[i], y.iloc[i]),
            textcoords="offset points",
            xytext=(6, 6),
            **style,
        )
    xlabel = "cold training seconds (as run + the cached features it reused)"
    ax.set(title="Accuracy against training time", xlabel=xlabel, ylabel=score.replace("_", " "))
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


def terminal_table(table: pd.DataFrame) -> str:
    """The table within 160 columns; the columns that did not fit are named on stderr."""
    fitted = fit(table)
    if fitted.left_out:
        note(f"left out of the table to fit {WIDTH} columns (comparison.csv has them): {', '.join(fitted.left_out)}")
    return fitted.text


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run
    seeds: pd.DataFrame | None  # one row per setting repeated over seeds or folds

    def to_json(self) -> dict[str, Any]:
        """Rows as records, empty cells as null: what `compare --json` prints."""
        return {"runs": _records(self.table), "seeds": None if self.seeds is None else _records(self.seeds)}


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records"))


def compare(patterns: list[str], out: Path, sort: str = SCORE, html: bool = False) -> Comparison:
    """Write comparison.csv/.md, per_class.csv, curves.png, per_class.png, tradeoff.png and, where
    seeds or folds repeat a setting, seeds.csv/.md (mean and std over them); `html`: report.html too."""
    runs = find_runs(patterns)
    for run in runs:
        if not run.finished:
            note(f"{run.name} finished {len(run.results)}/{run.config['train.epochs']} epochs; using those")
    table = comparison_table(runs, sort)
    seeds = seed_table(table, runs)
    if (tie := tie_note(table)) is not None:
        note(tie)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    atomic_write_text(out / "comparison.md", full_markdown(table) + "\n")
    if seeds is not None:
        atomic_write_text(out / "seeds.csv", seeds.to_csv(index=False))
        atomic_write_text(out / "seeds.md", full_markdown(seeds) + "\n")
    tradeoff = plot_tradeoff(table, "run") if seeds is None else plot_tradeoff(seeds, "setting")
    figures = {"curves.png": plot_curves(curve_lines(runs)), "tradeoff.png": tradeoff}
    for name, fig in {**figures, **_per_class(runs, out)}.items():
        fig.savefig(out / name, dpi=110)
    if html:
        write_compare_page(out, table, seeds, [n for n in (noise_note(table), tie) if n is not None])
    return Comparison(table, seeds)


def _per_class(runs: list[Run], out: Path) -> dict[str, Any]:
    """per_class.csv written and its figure, over the classes the runs share; none (and no
    files left from an earlier compare) when they share none."""
    if len({tuple(r.class_columns) for r in runs}) > 1:
        note("the runs have different classes; per-class results cover only the classes they share")
    table = per_class_table(runs)
    if table.empty:
        note("the runs share no classes: no per_class.csv or per_class.png")
        for name in ("per_class.csv", "per_class.png"):
            (out / name).unlink(missing_ok=True)
        return {}
    atomic_write_text(out / "per_class.csv", table.to_csv())
    return {"per_class.png": plot_per_class(table)}
