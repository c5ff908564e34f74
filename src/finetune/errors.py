"""Exceptions the CLI turns into exit codes; torch-free so that errors print fast."""

from __future__ import annotations

import signal
from pathlib import Path


class FinetuneError(Exception):
    """A user-fixable problem, carried as one line that names the culprit and the fix.

    The CLI prints it and exits with code 2; anything else is a bug and may trace back.
    """


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a resumable last.pt."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir
        self.resume_hint = f"finetune train --resume {run_dir}"
