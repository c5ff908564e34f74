"""Atomic writes for every run file, and no litter from a write that fails.

A file is written to a temp file in the same folder, fsynced and renamed over the old one,
so a kill or a full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; run files read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_temp_files(folder: Path) -> None:
    """Temp files of writes that a kill interrupted (the files they were to replace are intact).
    Call only while owning `folder`: a live writer's temp file looks the same."""
    for leftover in Path(folder).glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


@contextmanager
def removed_on_failure(root: Path, names: tuple[str, ...]) -> Iterator[None]:
    """If the block fails, remove what it created: the folders made to reach `root`, or the
    entries `names` of `root` that were not there before. What was there is never touched."""
    root = Path(root)
    there = os.path.lexists  # a link is there, dangling or not
    made = next((p for p in (*reversed(root.parents), root) if not there(p)), None)
    fresh = [root / name for name in names if not there(root / name)]
    try:
        yield
    except BaseException:
        for path in [made] if made is not None else fresh:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
