"""The stop signal: Ctrl-C or SIGTERM become a request the loop honours at a safe point.

The first signal asks for the stop; a second one (an impatient user, or torchrun passing on the
Ctrl-C its workers already got from the terminal) lets the save of the steps done so far
finish; only a third quits at once, and the run then resumes from its previous last.pt.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import TypeVar

from finetune.errors import Interrupted
from finetune.runtime.distributed import Ranks

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """Raised where the loop stops for a signal; `Trainer.fit` turns it into `Interrupted`."""


class StopSignal:
    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, _type: type | None, exc: BaseException | None, _tb: object) -> None:
        """The handlers before, unless a stop ends the run: the process is on its way out then,
        and a late Ctrl-C must not turn that exit into a traceback."""
        if isinstance(exc, Interrupted):
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self._say("stopping at the next safe point; last.pt will hold every step done so far")
            return
        for each in SIGNALS:  # torchrun's agent passes on a terminal Ctrl-C as SIGTERM: either quits next
            signal.signal(each, signal.SIG_DFL)
        self._say(
            "still stopping, saving every step done so far; a third Ctrl-C quits and loses those since the last save"
        )

    def _say(self, line: str) -> None:
        """One line on stderr from rank 0; written to the file descriptor, since a handler may run
        while the main thread is inside a write to sys.stderr (a progress bar)."""
        if self.ranks.main:
            os.write(2, f"\n{line}\n".encode())

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def guard(self, batches: Iterable[T]) -> Iterator[T]:
        """Batches of a long extraction or evaluation, ended within one batch of a signal.

        Under DDP the ranks extract different amounts and agree on stopping only at steps
        and epoch ends (a collective per batch here could wait on a rank that has none), so
        there a signal takes effect at the next vote.
        """
        for batch in batches:
            if self.requested and not self.ranks.many:
                raise StopRequested
            yield batch
