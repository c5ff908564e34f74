"""The runtime choice as a pure function: candidates, measured rates and the run's size in,
(precision, inference precision, memory format) out.

Kept apart from the measuring (calibrate.py) so the choice is tested on given rates: timings
taken on a busy machine could not test it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
PRECISIONS = ["fp32", "bf16", "fp16"]  # the stable order of ties: the exact one first
FORMATS = ["contiguous", "channels_last"]  # contiguous first: cuDNN's channels_last set-up is the slow one
NOISE = 0.1  # whole-run times this close are a tie, settled by the stable order: measurements on a busy machine vary


@dataclass(frozen=True)
class Candidate:
    precision: str  # fp32 | bf16 | fp16
    memory_format: str  # channels_last | contiguous

    @property
    def label(self) -> str:
        return f"{self.precision} {self.memory_format}"

    @property
    def layout(self) -> torch.memory_format:
        return LAYOUTS[self.memory_format]


@dataclass(frozen=True)
class Measured:
    """One candidate's rates on the run's model, at the measured batch."""

    precision: str
    memory_format: str
    train: float  # img/s of a forward+backward step of the stage that trains most
    infer: float  # img/s of a forward without grad (evaluation, feature-cache extraction)
    setup: float = 0.0  # seconds the first step at a new input shape costs over a steady one
    compiled: bool = False  # the train step under torch.compile: `setup` is then its compile time

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.precision, self.memory_format)

    @property
    def label(self) -> str:
        return f"{self.precision} {self.memory_format}" + (" compiled" if self.compiled else "")

    @property
    def failed(self) -> bool:
        """torch.compile could not build this step here (no compiler, say): never chosen."""
        return self.compiled and math.isinf(self.setup)


@dataclass(frozen=True)
class Workload:
    """How many images the run pushes through each path, per process."""

    train_images: int
    infer_images: int
    shapes: int = 2  # a full and a short last batch: each new shape pays `setup` once
    full_images: int = 0  # train images of the epochs that run the whole forward (not a cached cut)
    stages: int = 1  # what trains changes this often among those epochs: a compiled step recompiles each time

    def seconds(self, m: Measured) -> tuple[float, float]:
        """(train, inference) seconds the whole run would take with this candidate."""
        return self.shapes * m.setup + self.train_images / m.train, self.infer_images / m.infer

    def full_seconds(self, m: Measured) -> float:
        """Seconds of the whole-forward training, the part torch.compile would speed up."""
        return self.full_images / m.train


@dataclass(frozen=True)
class Choice:
    precision: str
    infer_precision: str
    memory_format: str
    compile: bool = False  # torch.compile the train step


def candidates(precision: str, memory_format: str, native: list[str]) -> list[Candidate]:
    """What `auto` may pick: the device's native precisions x both formats, less what the config pins."""
    precisions = native if precision == "auto" else [precision]
    formats = FORMATS if memory_format == "auto" else [memory_format]
    return [Candidate(p, f) for f in formats for p in precisions]


def choose(measured: list[Measured], work: Workload) -> Choice:
    """The choice that finishes the run soonest, unless it is within `NOISE` of an earlier one in
    the stable order: then that one, so a tie is never settled by one measurement's noise.

    The stable order: contiguous before channels_last, fp32 before bf16 before fp16, inference in
    the training precision first. A model has one memory format for
    the run, so both paths are timed in the same one; the precision may differ between them
    (autocast is per call).
    """
    eager = sorted((m for m in measured if not m.compiled), key=lambda m: PRECISIONS.index(m.precision))
    if not eager:
        raise ValueError("choose: nothing was measured")
    options = [
        (work.seconds(train)[0] + work.seconds(infer)[1], train, Choice(train.precision, infer.precision, fmt))
        for fmt in FORMATS
        for train in eager
        if train.memory_format == fmt
        for infer in sorted(eager, key=lambda m: m.precision != train.precision)
        if infer.memory_format == fmt
    ]
    fastest = min(total for total, _, _ in options)
    _, train, chosen = next(option for option in options if option[0] <= fastest * (1 + NOISE))
    compiled = next((m for m in measured if m.compiled and m.candidate == train.candidate), None)
    pays = compiled is not None and not compiled.failed
    return replace(chosen, compile=pays and compile_gain(train, compiled, work) > NOISE * work.full_seconds(train))


def compile_gain(eager: Measured, compiled: Measured, work: Workload) -> float:
    """Seconds torch.compile saves over the run: the faster steps of the whole-forward epochs,
    less a compile per input shape and per change of what trains."""
    saved = work.full_seconds(eager) - work.full_seconds(compiled)
    return saved - work.shapes * work.stages * compiled.setup


def only_choice(options: list[Candidate]) -> Choice | None:
    """The choice when the config pins both precision and memory format: nothing to measure."""
    if len(options) != 1:
        return None
    return Choice(options[0].precision, options[0].precision, options[0].memory_format)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to a 16-bit precision; fp32 runs as it is."""
    dtype = DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
