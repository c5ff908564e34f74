"""The stop signal: Ctrl-C or SIGTERM become a request the loop honours at a safe point.

A second Ctrl-C stops at once (the default handler is back after the first).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import TypeVar

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

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)

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
