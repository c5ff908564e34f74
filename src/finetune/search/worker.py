"""One tune worker's side of the study (rank 0 only): which trial to train next, the pruning
judge for it, and what to tell the storage when it ends.

Which trial next: first a RUNNING trial whose run dir no live process holds (its worker died:
the trial is resumed from last.pt under its own trial id, since Optuna lets any process report
to and tell a RUNNING trial), then a new trial while the study has fewer than its total. Two
workers can ask at once; a trial numbered past the total is told FAIL at once and never trains.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import TrialState

from finetune.errors import FinetuneError, Interrupted
from finetune.runs.lock import RunLock, claim
from finetune.runs.results import Judged
from finetune.runs.tracking import Link, Tracker
from finetune.runtime.distributed import Ranks, from_main
from finetune.search.parents import child_link, open_parent
from finetune.search.report import finished
from finetune.search.space import label
from finetune.search.tune import Job, Tune, best_trial, check_trial_dir, open_study, trial_name

if TYPE_CHECKING:
    from finetune.training.loop import Judge
    from finetune.training.session import Session

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
WHY = {
    "median": "worse than the median of the earlier trials at this epoch",
    "hyperband": "worse than the rest of its hyperband bracket at this epoch",
}


def sampler_for(seed: int, number: int) -> optuna.samplers.BaseSampler:
    """A TPE sampler seeded by (seed, trial number): a study continued by the same command draws
    what an uninterrupted one would (with one worker, whose history is the same). The seed goes
    in as SeedSequence words, which numpy's RandomState mixes fully (seeded by one int, the first
    draws of neighbouring trials came out close together)."""
    words = np.random.SeedSequence([seed, number]).generate_state(4)
    return optuna.samplers.TPESampler(seed=words)  # type: ignore[arg-type]  # RandomState.seed takes arrays


def claim_orphan(run_dir: Path) -> RunLock | None:
    """The dir of a RUNNING trial, if it is here and no live process holds it: its worker died.
    One that is not here may be trained right now on a machine that shares no filesystem."""
    return claim(run_dir) if run_dir.is_dir() else None


class Worker:
    def __init__(self, tune: Tune, study: optuna.Study):
        self.tune, self.study = tune, study

    def next_job(self) -> tuple[Job, RunLock, optuna.Trial] | None:
        """The next trial to train, its run dir claimed; None when nothing is left for this worker."""
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            lock = claim_orphan(self.tune.study_dir / trial_name(frozen.number))
            if lock is not None:  # its worker died: resume it
                return self._job(optuna.Trial(self.study, frozen._trial_id), lock)
        while self._counted() < self.tune.info.trials:
            trial = self.study.ask()
            if self._counted(below=trial.number) >= self.tune.info.trials:
                self.study.tell(trial, state=TrialState.FAIL)  # another worker asked the last one first
                return None
            lock = claim(self.tune.study_dir / trial_name(trial.number))
            if lock is not None:  # else a worker took it for an orphan in between
                return self._job(trial, lock)
        return None

    def _counted(self, below: int | None = None) -> int:
        trials = self.study.get_trials(deepcopy=False, states=COUNTED)
        return sum(below is None or t.number < below for t in trials)

    def _job(self, trial: optuna.Trial, lock: RunLock) -> tuple[Job, RunLock, optuna.Trial]:
        """The trial's values (drawn now, or as stored) and config, checked before it trains."""
        self.study.sampler = sampler_for(self.tune.info.seed, trial.number)
        try:
            values = {p.key: p.suggest(trial) for p in self.tune.params}
            return check_trial_dir(self.tune, lock, trial.number, values), lock, trial
        except (FinetuneError, ValueError) as exc:  # ValueError: Optuna refuses a changed set of choices
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            lock.release()
            fix = (
                "" if isinstance(exc, FinetuneError) else "; the study was run with another space: give another --study"
            )
            raise FinetuneError(f"tune: {trial_name(trial.number)}: {exc}{fix}") from None

    def judge(self, trial: optuna.Trial) -> Judge:
        """Report each epoch's monitored value; the pruner's verdict, as a reason to stop."""
        pruner, monitor = self.tune.info.pruner, self.tune.info.monitor

        def decide(epoch: int, value: float) -> str | None:
            with warnings.catch_warnings():  # a resumed trial reports its last epoch again: ignored
                warnings.simplefilter("ignore")
                trial.report(value, epoch)
            if not trial.should_prune():
                return None
            return f"{pruner} pruner: {monitor} {value:.4f} {WHY.get(pruner, '')}".strip()

        return decide

    def tell(self, trial: optuna.Trial, summary: dict[str, Any]) -> None:
        """The trial's result: its judged value (checkpoint.judge; its final value, which orders
        equal ones, as a user attr), or pruned."""
        name = trial_name(trial.number)
        if summary.get("pruned"):
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            print(f"{name}: pruned after epoch {summary['pruned']['epoch']}")
        elif summary.get("judged") is None:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            judged = Judged(**summary["judged"])
            trial.set_user_attr("final", judged.final)
            self.study.tell(trial, judged.value, skip_if_finished=True)
            print(f"{name}: {judged.describe(summary['monitor'])}")


def run_worker(tune: Tune, ranks: Ranks) -> optuna.Study | None:
    """Train trials until the study has its total; rank 0's study, None on other ranks."""
    from finetune.training.session import Session

    session = Session(ranks)
    parent = open_parent(tune.base_config.tracking.mlflow, tune.study_dir, tune.info.study, _study_params(tune), ranks)
    if not ranks.main:
        while (job := _receive(ranks)) is not None:
            with contextlib.suppress(FinetuneError):  # rank 0 says it; every rank goes on to the next trial
                _train(session, tune, job, lambda epoch, value: None)
        return None
    worker = Worker(tune, open_study(tune.study_dir, tune.info))
    try:
        _work(session, tune, worker, ranks, parent)
    except Interrupted:
        if parent:
            parent.end("KILLED")
        raise
    if parent and finished(worker.study, tune.info.trials):
        best = best_trial(worker.study)
        parent.end("FINISHED", tags={"best_trial": str(best.number)} if best else {})
    return worker.study


def _study_params(tune: Tune) -> dict[str, Any]:
    """A study's parent run's params: what the study is, and the space it searches ([low, high, log] or choices)."""
    info = {k: getattr(tune.info, k) for k in ("study", "trials", "seed", "pruner", "monitor", "judge")}
    space = {f"space.{p.key}": p.labels if p.choices else [p.low, p.high, p.log] for p in tune.params}
    return {**info, **space}


def _trial_link(parent: Tracker | None, job: Job) -> Link:
    """A trial's child run: its number and values as tags; its end (pruned, complete) its `state` tag."""
    tags = {"trial_number": str(job.number), **{f"trial.{k}": str(label(v)) for k, v in job.values.items()}}
    return child_link(parent, tags)


def _work(session: Session, tune: Tune, worker: Worker, ranks: Ranks, parent: Tracker | None) -> None:
    """Rank 0: take trials, train them, tell the storage, until the study has its total."""
    while True:
        try:
            taken = worker.next_job()
        except FinetuneError as exc:  # before the trial trains: every rank stops with the line
            from_main(("error", str(exc)), ranks)
            raise
        from_main(taken and ("job", taken[0]), ranks)
        if taken is None:
            return
        job, lock, trial = taken
        with lock:  # told under the lock: no other worker takes it for an orphan meanwhile
            try:
                summary = _train(session, tune, job, worker.judge(trial), _trial_link(parent, job))
            except FinetuneError as exc:  # this trial's values diverged (say): it fails, the study goes on
                worker.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                print(f"{trial_name(trial.number)} failed: {exc}")
                continue
            worker.tell(trial, summary or _saved_summary(lock.folder))


def _receive(ranks: Ranks) -> Job | None:
    """Rank 0's next job for the ranks that do not talk to the storage; None: the study is done."""
    message = from_main(None, ranks)
    if message is None:
        return None
    if message[0] == "error":
        raise FinetuneError(message[1])
    return message[1]


def _train(session: Session, tune: Tune, job: Job, judge: Judge, link: Link | None = None) -> dict[str, Any] | None:
    run_dir = tune.study_dir / trial_name(job.number)
    cfg = tune.config(job.number, job.values)
    print(f"{trial_name(job.number)}: " + ", ".join(f"{k}={label(v)}" for k, v in job.values.items()))
    try:
        return session.train(cfg, run_dir, resume=job.resume, judge=judge, link=link)
    except Interrupted as exc:
        exc.resume_hint = "rerun the same finetune tune command (the trial resumes from its last.pt)"
        raise


def _saved_summary(run_dir: Path) -> dict[str, Any]:
    """A trial trained to its end before its worker could tell the storage."""
    return json.loads((run_dir / "summary.json").read_text())
