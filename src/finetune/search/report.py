"""A study's report, written by the worker that finishes its last trial and by `finetune compare
STUDY_DIR`: compare's table and plots of the trials, best.yaml, parameter importances, and
Optuna's optimization-history, parallel-coordinate and slice plots (matplotlib backend)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.files import atomic_write_text
from finetune.runs.lock import claim
from finetune.runs.results import judged_by
from finetune.search.tune import StudyInfo, best_trial, open_study, trial_name, write_best

if TYPE_CHECKING:
    import optuna
    import pandas as pd

PLOTS = ("optimization_history", "parallel_coordinate", "slice")


def finished(study: optuna.Study, total: int) -> bool:
    """Whether the study has its total of trials and none is still running."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    return len(done) >= total and not running


def write_report(study_dir: Path, info: StudyInfo, study: optuna.Study | None = None) -> pd.DataFrame | None:
    """The report in the study dir; None when another worker is writing it right now."""
    from finetune.runs.compare import compare

    lock = claim(study_dir / "comparison")
    if lock is None:
        return None
    with lock:
        study = study or open_study(study_dir, info)
        runs = [
            str(study_dir / trial_name(t.number)) for t in study.trials if (study_dir / trial_name(t.number)).is_dir()
        ]
        table = compare(runs, study_dir / "comparison").table
        print(f"judged by: {judged_by(info.monitor, info.judge)}")
        _best(study, study_dir, info)
        _importances(study, study_dir)
        _plots(study, study_dir)
    return table


def _best(study: optuna.Study, study_dir: Path, info: StudyInfo) -> None:
    """best.yaml from the trial judged best, and a line that says which and why."""
    best = best_trial(study)
    path = best and write_best(best, study_dir, info)
    if path is not None:
        final = best.user_attrs.get("final")
        then = "" if final is None else f" (final {final:.4f})"
        print(f"best: {trial_name(best.number)}, judged {info.monitor} {best.value:.4f}{then}; {path}")


def _importances(study: optuna.Study, study_dir: Path) -> None:
    """fANOVA importances over the completed trials (two at least), in importances.json."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        print(f"importances: {len(complete)} completed trial(s); they need 2 or more")
        return
    try:
        with warnings.catch_warnings():  # fANOVA on a handful of trials warns about its quantiles
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:
        print(f"importances: not computed ({exc})")
        return
    atomic_write_text(study_dir / "importances.json", json.dumps(importances, indent=2))
    print("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))


def _plots(study: optuna.Study, study_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name in PLOTS:
        with warnings.catch_warnings():  # experimental-API and too-few-trials warnings
            warnings.simplefilter("ignore")
            result = getattr(plots, f"plot_{name}")(study)
        axes = result.flat[0] if hasattr(result, "flat") else result
        axes.figure.savefig(study_dir / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
