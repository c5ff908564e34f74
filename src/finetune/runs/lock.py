"""One owner per folder: the process that writes a run dir (or a sweep's comparison) holds an
flock on `<folder>/.lock` for as long as it writes there.

The kernel drops the lock when its process dies, even by kill -9, so a dead run can be resumed
at once; the file names the holder (pid, host, start time) for the message that refuses
another writer. flock also works across machines on NFSv4, which emulates it with byte-range
locks.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import remove_temp_files

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


class RunLock:
    """The lock of one folder; `made`: the folders this process created to claim it (the folder
    and any missing parents), so a run that fails before writing anything leaves none behind."""

    def __init__(self, folder: Path, made: tuple[Path, ...] = ()) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.made = made
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock unless a live process holds it. Once it is ours, temp files left in the
        folder are a dead writer's, so they go."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if _is_file_at(fd, self.path):
                break
            os.close(fd)  # the holder unlinked it while releasing: lock the file now at the path
        self._fd = fd
        me = Holder(os.getpid(), socket.gethostname(), datetime.datetime.now().astimezone().isoformat("T", "seconds"))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(asdict(me)).encode())
        remove_temp_files(self.folder)
        return True

    def holder(self) -> Holder | None:
        """Who holds the lock, as it wrote itself down (None while it is still writing)."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def release(self) -> None:
        """Unlink the lock file while still holding it, so no one locks a file that then vanishes."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        for folder in self.made:  # innermost first; one the run wrote into is not empty and stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def claim(folder: Path, only_new: bool = False) -> RunLock | None:
    """Create `folder` if needed and lock it; None when a live process holds it, or with
    `only_new` when it existed before (mkdir is atomic: of two processes, one creates it)."""
    try:
        made = _make(folder)
        if only_new and not made:
            return None
        lock = RunLock(folder, made)
        return lock if lock.try_acquire() else None
    except OSError as exc:
        raise FinetuneError(f"run dir {folder} cannot be written ({exc.strerror}); choose another dir") from None


def _make(folder: Path) -> tuple[Path, ...]:
    """The folders this call created, `folder` first and then its missing parents; none if it existed."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return ()
    return tuple(missing)


def hold(folder: Path, flag: str) -> RunLock:
    """`claim`, or one line naming the live process that holds the folder."""
    lock = claim(folder)
    if lock is None:
        holder = RunLock(folder).holder() or "another process"
        raise FinetuneError(f"{flag} {folder} is in use by {holder}; wait for that run to end, or stop it first")
    return lock
