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
    """The lock of one folder; `remove_if_empty` for a folder this process created to claim it,
    so a run that fails before writing anything leaves no empty dir behind."""

    def __init__(self, folder: Path, remove_if_empty: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.remove_if_empty = remove_if_empty
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
        if self.remove_if_empty:
            with contextlib.suppress(OSError):  # not empty: the run wrote files, and they stay
                self.folder.rmdir()
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
        created = _make(folder)
        if only_new and not created:
            return None
        lock = RunLock(folder, remove_if_empty=created)
        return lock if lock.try_acquire() else None
    except OSError as exc:
        raise FinetuneError(f"run dir {folder} cannot be written ({exc.strerror}); choose another dir") from None


def _make(folder: Path) -> bool:
    """Whether this call created `folder`."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def hold(folder: Path, flag: str) -> RunLock:
    """`claim`, or one line naming the live process that holds the folder."""
    lock = claim(folder)
    if lock is None:
        holder = RunLock(folder).holder() or "another process"
        raise FinetuneError(f"{flag} {folder} is in use by {holder}; wait for that run to end, or stop it first")
    return lock
