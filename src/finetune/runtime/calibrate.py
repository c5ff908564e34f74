"""Time the runtime candidates on the run's real model, so that load cannot flip the answer.

A copy of the model is put in the stage that trains most (every group joined: they only join),
so the rates are those of the run's heaviest steps, at its image size and its batch; the copy
and a forked RNG keep the run itself untouched. Candidates are timed in interleaved rounds and
each keeps its fastest step.

On a CPU a step is timed as the CPU time it costs on one thread, not as wall time on the run's
threads: other processes time-slice a team of threads unevenly (a thread waiting at a barrier
for one that was descheduled), which once made bf16 look 3x slower than fp32 on a busy machine
where it is 1.8x faster idle. One thread's CPU time hardly moves with load (ResNet18 at 128 px:
bf16 1.82x fp32 idle, 1.93x under two spinning processes) and ranks the candidates as the
run's threads do on an idle machine. On a GPU, wall time after a synchronize is the cost.

A one-core rate is recorded times the run's torch threads (perfect scaling, which no CPU
reaches): set-ups (a compile, mostly serial; channels_last's first step) are then weighed
against step times that are, if anything, too short, so a compile never looks better than it is.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator
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
# a CPU step counts on the run's threads when they were on a core this share of its wall time
# (idle: about all of it, waiting threads spin; beside two busy processes on 2 cores: about half)
UNDISTURBED = 0.8
COMPILE_IMAGES = {"cpu": 50_000, "cuda": 500_000}  # whole-forward train images a run needs for a compile timing


@dataclass
class Calibration:
    measured: list[Measured]
    batch: int  # the batch the rates were measured at
    seconds: float  # what measuring cost
    rounds: int = MIN_ROUNDS  # timed rounds of the candidates still in the running
    threads: int = 1  # on a CPU: the one-core rates were multiplied by the run's torch threads
    one_core: bool = False  # the machine was busy: rates from one thread's CPU time (the module's docstring)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Calibration:
        """As `dataclasses.asdict` wrote it (cache file, last.pt)."""
        measured = [Measured(**m) for m in saved["measured"]]
        rounds, threads = saved.get("rounds", MIN_ROUNDS), saved.get("threads", 1)
        return cls(measured, saved["batch"], saved["seconds"], rounds, threads, saved.get("one_core", False))


@dataclass
class _Times:
    warm: float  # the first train step at this shape and format
    train: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)

    @staticmethod
    def keep(seconds: float, undisturbed: bool, into: list[float]) -> None:
        """A step's time counts where it had the run's threads to itself: load only adds time."""
        if undisturbed:
            into.append(seconds)

    def measured(self, c: Candidate, batch: int, threads: int) -> Measured:
        """The fastest step of each kind: interference from other processes only adds time. The
        set-up is one sample, which load can stretch by a few steps: it counts only past
        `SETUP_STEPS` steps (cuDNN's channels_last set-up takes seconds), else it is noise."""
        step = min(self.train)
        setup = self.warm - step if self.warm > (SETUP_STEPS + 1) * step else 0.0
        return Measured(c.precision, c.memory_format, threads * batch / step, threads * batch / min(self.infer), setup)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (a compile's C++ compiler runs)."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


@contextlib.contextmanager
def one_core(device: torch.device) -> Iterator[None]:
    """On a CPU: torch on one thread while timing (and torch.compile's compiler in this process,
    so `cpu_seconds` counts it), the run's settings back after."""
    if device.type != "cpu":
        yield
        return
    import torch._inductor.config as inductor

    threads, compile_threads = torch.get_num_threads(), inductor.compile_threads
    torch.set_num_threads(1)
    inductor.compile_threads = 1
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        inductor.compile_threads = compile_threads


class Bench:
    """One train step and one forward of a model, timed for a candidate at a batch size: wall
    seconds, noting on a CPU whether the step had the run's threads to itself (`undisturbed`),
    or with `on_one_core` the CPU seconds of one thread (see the module's docstring)."""

    def __init__(self, model: nn.Module, device: torch.device, image_size: int):
        self.model, self.device, self.size = model, device, image_size
        self.on_one_core = False
        self.undisturbed = True  # the last step's threads were on a core for all of it
        self.modes = {m: m.training for m in model.modules()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(0)
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.format = ""

    def train_step(self, c: Candidate, batch: int) -> float:
        x = self._input(c, batch)
        with self._timed() as seconds:
            with autocast(self.device, c.precision):
                loss = self.model(x).float().logsumexp(1).mean()  # any loss: only the step's cost matters
            loss.backward()
        for p in self.params:
            p.grad = None
        return seconds[0]

    @contextlib.contextmanager
    def _timed(self) -> Iterator[list[float]]:
        """The block's cost, in the list it yields once the block ends (the device synchronized)."""
        wall, cpu, cost = time.perf_counter(), cpu_seconds(), [0.0]
        yield cost
        synchronize(self.device)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        cost[0] = cpu if self.on_one_core else wall
        on_threads = self.device.type == "cpu" and not self.on_one_core
        self.undisturbed = not on_threads or cpu >= UNDISTURBED * torch.get_num_threads() * wall

    def infer_step(self, c: Candidate, batch: int) -> float:
        x = self._input(c, batch)
        self.model.eval()
        with self._timed() as seconds, torch.no_grad(), autocast(self.device, c.precision):
            self.model(x)
        for module, mode in self.modes.items():
            module.train(mode)
        return seconds[0]

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
    with staged_bench(cfg, model, head_name, device) as bench:
        return measure(bench, options, cfg.data.batch_size, BUDGET_S)


@contextlib.contextmanager
def staged_bench(
    cfg: Config, model: nn.Module, head_name: str, device: torch.device, compiled: bool = False
) -> Iterator[Bench]:
    """A Bench on a copy of `model` in its last stage (see `stage_copy`), on a forked RNG; the
    copy's memory freed after."""
    copied = stage_copy(cfg, model, head_name, device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield Bench(torch.compile(copied) if compiled else copied, device, cfg.data.image_size)
    finally:
        del copied
        if device.type == "cuda":
            torch.cuda.empty_cache()


def worth_compiling(work: Workload, device: torch.device) -> bool:
    """Whether to time torch.compile at all: it costs a compile (20 s to minutes on a CPU), so only
    a run long enough to make that small is worth the try. Counted in images, not from a timed
    rate, so a busy machine (slower steps, a run that looks longer) does not start a compile
    that an idle one would not: the same config trains the same numerics under any load."""
    return work.full_images >= COMPILE_IMAGES.get(device.type, COMPILE_IMAGES["cuda"])


def measure_compiled(
    cfg: Config, model: nn.Module, head_name: str, device: torch.device, eager: Measured, calibration: Calibration
) -> Measured:
    """`eager`'s candidate with its train step under torch.compile: the steady rate, and the
    compile time as its set-up (inference stays eager: it is the train step that repeats),
    timed as the eager rates were (on the run's threads, or on one core)."""
    print(f"timing torch.compile of the {eager.label} train step (it compiles first: tens of seconds)")
    threads, batch = calibration.threads, calibration.batch
    alone = one_core(device) if calibration.one_core else contextlib.nullcontext()
    with staged_bench(cfg, model, head_name, device, compiled=True) as bench, alone:
        bench.on_one_core = calibration.one_core
        try:
            first = bench.train_step(eager.candidate, batch)
        except Exception as exc:  # any backend failure (no C++ compiler, no triton): the run trains eager
            print(f"torch.compile failed here ({str(exc).splitlines()[0][:200]}): the run trains eager")
            return Measured(eager.precision, eager.memory_format, eager.train, eager.infer, math.inf, compiled=True)
        step = min(bench.train_step(eager.candidate, batch) for _ in range(3))
    setup = max(0.0, first - step)
    return Measured(eager.precision, eager.memory_format, threads * batch / step, eager.infer, setup, compiled=True)


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
    if (on_threads := _rounds(bench, options, batch, budget, 1)) is not None:
        return on_threads
    bench.on_one_core = True
    try:
        with one_core(bench.device):
            return _rounds(bench, options, batch, budget, run_threads(bench.device))
    finally:
        bench.on_one_core = False


def run_threads(device: torch.device) -> int:
    """What a one-core rate is multiplied by: the run's torch threads on a CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def _rounds(bench: Bench, options: list[Candidate], batch: int, budget: float, threads: int) -> Calibration | None:
    """The timed rounds; None where a candidate got no step with the run's threads to itself."""
    started = time.perf_counter()
    bench.train_step(options[0], batch)  # the process's first step (threads, allocator) is no candidate's set-up
    times = {c: _Times(warm=bench.train_step(c, batch)) for c in options}
    for c in options:
        bench.infer_step(c, batch)
    running, rounds = list(options), 0
    while rounds < MAX_ROUNDS:
        shift = rounds % len(running)
        for c in running[shift:] + running[:shift]:
            times[c].keep(bench.train_step(c, batch), bench.undisturbed, times[c].train)
            times[c].keep(bench.infer_step(c, batch), bench.undisturbed, times[c].infer)
        rounds += 1
        running = _contenders(times, running, LOSER if rounds >= MIN_ROUNDS else FAR_LOSER)
        if len(running) < 2 or (rounds >= MIN_ROUNDS and time.perf_counter() - started > budget):
            break
    if any(not t.train or not t.infer for t in times.values()):
        return None
    measured = [t.measured(c, batch, threads) for c, t in times.items()]
    return Calibration(measured, batch, time.perf_counter() - started, rounds, threads, bench.on_one_core)


def _contenders(times: dict[Candidate, _Times], running: list[Candidate], factor: float) -> list[Candidate]:
    """The candidates not `factor` times slower than the best on both the train and the inference step."""
    fastest = {c: (min(times[c].train, default=math.inf), min(times[c].infer, default=math.inf)) for c in running}
    train, infer = min(f[0] for f in fastest.values()), min(f[1] for f in fastest.values())
    return [c for c in running if fastest[c][0] <= factor * train or fastest[c][1] <= factor * infer]
