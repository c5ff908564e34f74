"""Run directories: a fresh one that never overwrites, or an existing one to resume."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.config import Config, apply_override, flatten, from_dict, read_yaml, saved_config, to_yaml
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text

RESUMABLE_CHANGES = {"train.epochs", "log.tensorboard"}


def new_run_dir(cfg: Config, run_dir: str | None) -> Path:
    """`run_dir` if given and unused, else `<out_dir>/<name>`, `-2`, `-3` ... whichever is free."""
    if run_dir is not None:
        path = Path(run_dir)
        if (path / "config.yaml").exists():
            raise FinetuneError(f"--run-dir {path} already holds a run; pick a new dir or use --resume {path}")
        _check_writable(path)
        return path
    base = Path(cfg.out_dir) / cfg.name
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{cfg.name}-{n}")
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"run dir {path}: {existing} is not writable; choose another out_dir or --run-dir")


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
    """The run's saved config; only `train.epochs` may change (and only upward)."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise FinetuneError(f"--resume {path}: no config.yaml there, so it holds no run to resume")
    saved = saved_run_config(path)
    new_raw = read_yaml(Path(config_path)) if config_path else saved.to_dict()
    for item in overrides:
        apply_override(new_raw, item)
    new = from_dict(new_raw, source=config_path or "--set")
    keys = config_changes(saved, new)
    if keys:
        raise FinetuneError(
            f"--resume {path}: config differs from the run's in {', '.join(keys)}; "
            "only train.epochs may change on resume (start a new run for the rest)"
        )
    if new.train.epochs < saved.train.epochs:
        raise FinetuneError(f"--resume: train.epochs may only be raised (run has {saved.train.epochs})")
    return new


def remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted; the files they were to replace are intact."""
    for leftover in Path(run_dir).glob(".*.tmp"):
        leftover.unlink()
