"""Run directories: a fresh one that never overwrites, or an existing one to resume, each
owned by one process (lock.py), and the rules for continuing a run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.load import apply_overrides, from_dict, read_yaml, saved_config
from finetune.config.schema import Config, flatten, to_yaml
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs.lock import RunLock, claim, hold

if TYPE_CHECKING:
    from finetune.runtime.distributed import Ranks

# how many processes load the images changes no batch; where a run is tracked changes no weight
RESUMABLE_CHANGES = {
    "train.epochs",
    "log.tensorboard",
    "data.num_workers",
    "checkpoint.keep",
    "checkpoint.judge",
    "tracking.mlflow",
}


def claim_new_run_dir(cfg: Config, run_dir: str | None) -> RunLock:
    """A new run's dir, created and locked by this process: `run_dir` if it holds no run, else
    `<out_dir>/<name>`, `-2`, `-3` ... whichever this process creates first, so two runs
    started at once never share one."""
    if run_dir is not None:
        return _claim_given(Path(run_dir))
    base = Path(cfg.out_dir) / cfg.name
    n, lock = 1, claim(base, only_new=True)
    while lock is None:
        n += 1
        lock = claim(base.with_name(f"{cfg.name}-{n}"), only_new=True)
    return lock


def _claim_given(path: Path) -> RunLock:
    lock = hold(path, "--run-dir")
    if (path / "config.yaml").exists():
        lock.release()
        raise FinetuneError(f"--run-dir {path} already holds a run; pick a new dir or use --resume {path}")
    return lock


@contextmanager
def owned_run_dir(cfg: Config, run_dir: str | None, resume: str | None, ranks: Ranks) -> Iterator[Path]:
    """The run's dir, claimed (a new run) or locked (a resumed one) by rank 0 alone and held for
    the with-block; every rank gets rank 0's path, or its error."""
    from finetune.runtime.distributed import from_main

    lock, error = None, None
    if ranks.main:
        try:
            lock = hold(Path(resume), "--resume") if resume else claim_new_run_dir(cfg, run_dir)
        except FinetuneError as exc:
            error = str(exc)
    path, error = from_main((lock and lock.folder, error), ranks)
    if error is not None:
        raise FinetuneError(error)
    with lock or nullcontext():
        yield path


def create_run_dir(path: Path, cfg: Config) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.yaml", to_yaml(cfg))
    except OSError as exc:
        raise FinetuneError(f"run dir {path} cannot be written ({exc.strerror}); choose another --run-dir") from None


def saved_run_config(run_dir: Path) -> Config:
    saved_file = run_dir / "config.yaml"
    return from_dict(saved_config(read_yaml(saved_file)), source=str(saved_file))


def config_changes(saved: Config, new: Config) -> list[str]:
    """Keys that differ, other than train.epochs (which resume may raise)."""
    before, after = flatten(saved.to_dict()), flatten(new.to_dict())
    keys = {k for k in before.keys() | after.keys() if repr(before.get(k)) != repr(after.get(k))}
    return sorted(keys - RESUMABLE_CHANGES)


def resume_config(run_dir: str, overrides: list[str], config_path: str | None) -> Config:
    """The run's saved config, with the changes `check_continuation` allows."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise FinetuneError(f"--resume {path}: no config.yaml there, so it holds no run to resume")
    saved = saved_run_config(path)
    new_raw = read_yaml(Path(config_path)) if config_path else saved.to_dict()
    apply_overrides(new_raw, overrides)
    new = from_dict(new_raw, source=config_path or "--set")
    check_continuation(saved, new, f"--resume {path}", "start a new run for the rest")
    return new


def check_continuation(saved: Config, new: Config, where: str, fix: str) -> None:
    """The rules for continuing a run, for `train --resume` and a sweep's rerun alike: only
    train.epochs may change (and log.tensorboard, data.num_workers), and epochs only upward."""
    keys = config_changes(saved, new)
    if keys:
        raise FinetuneError(
            f"{where}: config differs from the run's in {', '.join(keys)}; "
            f"only train.epochs may change when a run continues ({fix})"
        )
    if new.train.epochs < saved.train.epochs:
        raise FinetuneError(
            f"{where}: train.epochs may only be raised (run has {saved.train.epochs}), "
            f"not lowered to {new.train.epochs}; {fix}"
        )


def is_finished(summary: dict[str, Any], epochs: int) -> bool:
    """Whether a run whose summary.json says `summary` has nothing left to train for `epochs`:
    it completed them, stopped early before its last epoch (a stop on the last epoch is
    just its end, so raising train.epochs extends it), or tune's pruner ended it."""
    return summary["epochs_completed"] >= epochs or ended_for_good(summary)


def ended_for_good(summary: dict[str, Any]) -> bool:
    """Whether no train.epochs could continue the run: it stopped early before its last epoch,
    or tune's pruner ended it."""
    stopped = summary.get("stopped_early")
    return (stopped is not None and stopped["epoch"] < summary["epochs"]) or summary.get("pruned") is not None
