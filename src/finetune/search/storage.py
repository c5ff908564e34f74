"""`finetune sweep ... --storage URL`: a sweep's runs dealt out to workers through a study that
they share, so workers on machines that share no filesystem still train each run once.

Run i of the expanded grid is trial number i of the study `sweep-<sweep dir name>`: the storage
hands out trial numbers atomically, so each worker's `ask` gets a run no other worker got. As in
tune, a trial left RUNNING by a dead worker is resumed (from last.pt) by the next worker that
finds its run dir unlocked: the same command again on that machine, or any worker on a shared
filesystem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from finetune.errors import FinetuneError
from finetune.runs.lock import RunLock, claim
from finetune.runs.tracking import Link
from finetune.search.parents import child_link
from finetune.search.sweep import SweepRun, _finished, _train
from finetune.search.tune import connect
from finetune.search.worker import claim_orphan

if TYPE_CHECKING:
    from finetune.training.session import Session


def run_shared(runs: list[SweepRun], out: Path, url: str) -> list[SweepRun]:
    """Train the runs this worker is dealt; return the runs still running elsewhere."""
    from finetune.training.session import Session

    study = connect(out, url, f"sweep-{out.name}", "maximize")
    session, link = Session(), child_link(None)  # each run tracked on its own: machines share no parent dir
    while (taken := _next(study, runs, out)) is not None:
        trial, lock = taken
        run = runs[trial.number]
        with lock:
            try:
                value = _run(session, run, lock, f"[{trial.number + 1}/{len(runs)}] {run.name}", link)
            except FinetuneError:  # a user error in this run: the sweep stops with its line, as sweep does
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            study.tell(trial, value, state=None if value is not None else TrialState.FAIL, skip_if_finished=True)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [runs[t.number] for t in running if t.number < len(runs)]


def _next(study: optuna.Study, runs: list[SweepRun], out: Path) -> tuple[optuna.Trial, RunLock] | None:
    """A run whose worker died (RUNNING, its dir unlocked here), else the next run nobody got."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lock = claim_orphan(out / runs[frozen.number].name) if frozen.number < len(runs) else None
        if lock is not None:
            return optuna.Trial(study, frozen._trial_id), lock
    while len(study.get_trials(deepcopy=False)) < len(runs):
        trial = study.ask()
        if trial.number >= len(runs):  # another worker asked for the last run at the same moment
            study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr("run", runs[trial.number].name)
        lock = claim(out / runs[trial.number].name)
        if lock is not None:  # else a worker took it for a dead one's in between
            return trial, lock
    return None


def _run(session: Session, run: SweepRun, lock: RunLock, label: str, link: Link) -> float | None:
    """Train the run (or find it finished); its best monitored value."""
    run.cfg.out_dir = str(lock.folder.parent)  # one feature store for the sweep, as in sweep
    if not _finished(lock.folder, run.cfg):
        _train(session, run, lock.folder, label, link)
    else:
        print(f"{label}: finished before, skipped")
    return json.loads((lock.folder / "summary.json").read_text()).get("best_value")
