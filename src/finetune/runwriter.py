"""Everything a run writes, in one place: config.yaml, best.pt, last.pt, results.csv and
summary.json, each atomically. Under DDP only rank 0 has a writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.checkpoint import save_checkpoint
from finetune.config import Config
from finetune.files import atomic_write_text
from finetune.results import ResultsLog
from finetune.rundir import create_run_dir


class RunWriter:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def start(self, cfg: Config) -> None:
        create_run_dir(self.run_dir, cfg)

    def best(self, portable: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "best.pt", portable)

    def last(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "last.pt", state)

    def epoch(self, state: dict[str, Any], log: ResultsLog, summary: dict[str, Any]) -> None:
        """last.pt first: results.csv and summary.json never get ahead of what resume restores."""
        self.last(state)
        self.results(log)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    def results(self, log: ResultsLog) -> None:
        atomic_write_text(self.run_dir / "results.csv", log.csv())
