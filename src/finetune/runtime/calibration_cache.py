"""Measured runtime rates kept in the user's cache dir, so only the first run of a (machine,
model, size, batch, trainable part) pays for measuring; a second run, a sweep or a tune reads
them. One small JSON file per key, written atomically: concurrent runs at worst measure twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from finetune.files import atomic_write_text
from finetune.runtime.calibrate import Calibration


def cache_dir() -> Path:
    """$FINETUNE_CACHE_DIR, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune"


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "runtime" / f"{digest}.json"


def load(key: dict[str, Any]) -> Calibration | None:
    """The stored calibration for `key`; None when there is none (or it is unreadable)."""
    try:
        stored = json.loads(_path(key).read_text())
        if stored["key"] != key:
            return None
        return Calibration.from_dict(stored)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(key: dict[str, Any], calibration: Calibration) -> None:
    """Store it; a cache dir that cannot be written costs a measurement next time, not the run."""
    record = {"key": key, **asdict(calibration)}
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1))
    except OSError as exc:
        print(f"note: could not store the runtime measurement in {path.parent} ({exc}); set FINETUNE_CACHE_DIR")
