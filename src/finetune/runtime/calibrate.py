"""Time the runtime candidates on the run's real model, so that load cannot flip the answer.

A copy of the model is put in the stage that trains most (every group joined: they only join),
so the rates are those of the run's heaviest steps, at its image size and its batch; the copy
and a forked RNG keep the run itself untouched. Candidates are timed in interleaved rounds and
each keeps its fastest step: another process on the machine slows every candidate of a round
alike and only ever adds time, so the ranking an idle machine gives survives a busy one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.model.freezing import set_train_mode
from finetune.model.schedule import Schedule
from finetune.runtime.candidates import Candidate, Measured, Workload, autocast
from finetune.runtime.hardware import synchronize

BUDGET_S = 20.0  # rounds past the first two stop here: paid once per machine, model, size, batch and trainable part
MIN_ROUNDS = 2  # timed rounds every candidate gets whatever the budget: one timing can be unlucky
MAX_ROUNDS = 5  # enough for the fastest step of each to settle
LOSER = 1.5  # a candidate this much slower than the best on both paths after `MIN_ROUNDS` is not re-timed
SETUP_STEPS = 5  # a first step longer than this many steady ones pays a real set-up (not load's noise)
FAR_LOSER = 3.0  # nor one this much slower after the first round (bf16 depthwise convolutions on a CPU, say)
COMPILE_IMAGES = {"cpu": 50_000, "cuda": 500_000}  # whole-forward train images a run needs for a compile timing


@dataclass
class Calibration:
    measured: list[Measured]
    batch: int  # the batch the rates were measured at
    seconds: float  # what measuring cost
    rounds: int = MIN_ROUNDS  # timed rounds of the candidates still in the running

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Calibration:
        """As `dataclasses.asdict` wrote it (cache file, last.pt)."""
        measured = [Measured(**m) for m in saved["measured"]]
        return cls(measured, saved["batch"], saved["seconds"], saved.get("rounds", MIN_ROUNDS))


@dataclass
class _Times:
    warm: float  # the first train step at this shape and format
    train: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)

    def measured(self, c: Candidate, batch: int) -> Measured:
        """The fastest step of each kind: interference from other processes only adds time. The
        set-up is one sample, which load can stretch by a few steps: it counts only past
        `SETUP_STEPS` steps (cuDNN's channels_last set-up takes seconds), else it is noise."""
        step = min(self.train)
        setup = self.warm - step if self.warm > (SETUP_STEPS + 1) * step else 0.0
        return Measured(c.precision, c.memory_format, batch / step, batch / min(self.infer), setup)


class Bench:
    """One train step and one forward of a model, timed for a candidate at a batch size."""

    def __init__(self, model: nn.Module, device: torch.device, image_size: int):
        self.model, self.device, self.size = model, device, image_size
        self.modes = {m: m.training for m in model.modules()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(0)
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.format = ""

    def train_step(self, c: Candidate, batch: int) -> float:
        x = self._input(c, batch)
        start = time.perf_counter()
        with autocast(self.device, c.precision):
            loss = self.model(x).float().logsumexp(1).mean()  # any loss: only the step's cost matters
        loss.backward()
        synchronize(self.device)
        seconds = time.perf_counter() - start
        for p in self.params:
            p.grad = None
        return seconds

    def infer_step(self, c: Candidate, batch: int) -> float:
        x = self._input(c, batch)
        self.model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(self.device, c.precision):
            self.model(x)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        for module, mode in self.modes.items():
            module.train(mode)
        return seconds

    def _input(self, c: Candidate, batch: int) -> torch.Tensor:
        if self.format != c.memory_format:
            self.model.to(memory_format=c.layout)
            self.format = c.memory_format
        key = (batch, c.memory_format)
        if key not in self.inputs:
            x = torch.randn(batch, 3, self.size, self.size, generator=self.generator)
            self.inputs[key] = x.to(self.device).contiguous(memory_format=c.layout)
        return self.inputs[key]


def calibrate(
    cfg: Config, model: nn.Module, head_name: str, device: torch.device, options: list[Candidate]
) -> Calibration:
    """Rates of every candidate on a copy of `model` in its last stage, on `device`, at the run's batch."""
    copied = stage_copy(cfg, model, head_name, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = Bench(copied, device, cfg.data.image_size)
        result = measure(bench, options, cfg.data.batch_size, BUDGET_S)
    del copied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def worth_compiling(work: Workload, device: torch.device) -> bool:
    """Whether to time torch.compile at all: it costs a compile (20 s to minutes on a CPU), so only
    a run long enough to make that small is worth the try. Counted in images, not from a timed
    rate, so a busy machine (slower steps, a run that looks longer) does not start a compile
    that an idle one would not: the same config trains the same numerics under any load."""
    return work.full_images >= COMPILE_IMAGES.get(device.type, COMPILE_IMAGES["cuda"])


def measure_compiled(
    cfg: Config, model: nn.Module, head_name: str, device: torch.device, eager: Measured, batch: int
) -> Measured:
    """`eager`'s candidate with its train step under torch.compile: the steady rate, and the
    compile time as its set-up (inference stays eager: it is the train step that repeats)."""
    print(f"timing torch.compile of the {eager.label} train step (it compiles first: tens of seconds)")
    copied = stage_copy(cfg, model, head_name, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = Bench(torch.compile(copied), device, cfg.data.image_size)
        try:
            first = bench.train_step(eager.candidate, batch)
        except Exception as exc:  # any backend failure (no C++ compiler, no triton): the run trains eager
            print(f"torch.compile failed here ({str(exc).splitlines()[0][:200]}): the run trains eager")
            return Measured(eager.precision, eager.memory_format, eager.train, eager.infer, math.inf, compiled=True)
        step = min(bench.train_step(eager.candidate, batch) for _ in range(3))
    setup = max(0.0, first - step)
    return Measured(eager.precision, eager.memory_format, batch / step, eager.infer, setup, compiled=True)


def stage_copy(cfg: Config, model: nn.Module, head_name: str, device: torch.device) -> nn.Module:
    """A copy of `model` on `device` as it trains once every group has joined (groups only join,
    so that is the run's heaviest stage, whenever a stage waiting for a plateau starts)."""
    copied = copy.deepcopy(model).to(device)
    schedule = Schedule(cfg.train, copied, head_name, steps_per_epoch=1)
    trainable = {name for g in schedule.groups for name in g.params}
    for name, param in copied.named_parameters():
        param.requires_grad_(name in trainable)
    set_train_mode(copied, schedule, cfg.train.epochs)
    return copied


def measure(bench: Bench, options: list[Candidate], batch: int, budget: float) -> Calibration:
    """A warm-up step of each candidate (its set-up at this shape), then timed rounds of all of
    them in turn, the order rotating so none always runs first: at least `MIN_ROUNDS`, more while
    `budget` lasts, clear losers dropped after the first rounds."""
    started = time.perf_counter()
    bench.train_step(options[0], batch)  # the process's first step (threads, allocator) is no candidate's set-up
    times = {c: _Times(warm=bench.train_step(c, batch)) for c in options}
    for c in options:
        bench.infer_step(c, batch)
    running, rounds = list(options), 0
    while rounds < MAX_ROUNDS:
        shift = rounds % len(running)
        for c in running[shift:] + running[:shift]:
            times[c].train.append(bench.train_step(c, batch))
            times[c].infer.append(bench.infer_step(c, batch))
        rounds += 1
        running = _contenders(times, running, LOSER if rounds >= MIN_ROUNDS else FAR_LOSER)
        if len(running) < 2 or (rounds >= MIN_ROUNDS and time.perf_counter() - started > budget):
            break
    measured = [t.measured(c, batch) for c, t in times.items()]
    return Calibration(measured, batch, time.perf_counter() - started, rounds)


def _contenders(times: dict[Candidate, _Times], running: list[Candidate], factor: float) -> list[Candidate]:
    """The candidates not `factor` times slower than the best on both the train and the inference step."""
    train, infer = min(min(times[c].train) for c in running), min(min(times[c].infer) for c in running)
    return [c for c in running if min(times[c].train) < factor * train or min(times[c].infer) < factor * infer]
