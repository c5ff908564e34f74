"""Time the runtime candidates on the run's real model, within a few seconds (issue 16).

A copy of the model is put in the stage that trains most (every group joined: they only join),
so the rates are those of the run's heaviest steps, at its image size and batch; the copy
and a forked RNG keep the run itself untouched. A batch whose timing would not fit the budget
(a large model on a CPU) is measured at the largest smaller batch that does.
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

BUDGET_S = 5.0  # the first run of a (machine, model, size) pays at most about this
MIN_BATCH = 2  # BatchNorm in train mode needs two samples
STEP_COST = 3.0  # one candidate's first round, in train steps: two of them and two forwards
FIRST_ROUND = 0.6  # of the budget, to time every candidate once; the rest re-times the close ones
CLOSE = 0.75  # candidates this close to the best train rate are timed again: one timing can be unlucky
ROUNDS = 4  # re-timings at most: enough to beat noise, and a fast GPU stops early
RUN_SHARE = 0.03  # of a run's estimated length, the most it spends measuring
COMPILE_GUESS_S = 30.0  # what compiling a ResNet18 train step took on 2 CPU cores: what trying torch.compile risks
COMPILE_SHARE = 0.1  # it is tried on a run whose whole-forward training takes at least 10x that


@dataclass
class Calibration:
    measured: list[Measured]
    batch: int  # the batch the rates were measured at
    seconds: float  # what measuring cost
    skipped: list[str] = field(default_factory=list)  # candidates left unmeasured: the budget ran out
    short_run: bool = False  # too short a run to pay for measuring: the first candidate only, not cached

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Calibration:
        """As `dataclasses.asdict` wrote it (cache file, last.pt)."""
        measured = [Measured(**m) for m in saved["measured"]]
        return cls(measured, saved["batch"], saved["seconds"], saved.get("skipped", []), saved.get("short_run", False))


@dataclass
class _Times:
    warm: float  # the first train step at this shape and format
    train: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)

    def measured(self, c: Candidate, batch: int) -> Measured:
        """The fastest step of each kind: interference from other processes only adds time."""
        step = min(self.train)
        return Measured(c.precision, c.memory_format, batch / step, batch / min(self.infer), max(0.0, self.warm - step))


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
        self._sync()
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
        self._sync()
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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


def calibrate(
    cfg: Config, model: nn.Module, head_name: str, device: torch.device, options: list[Candidate], train_images: int
) -> Calibration:
    """Rates of every candidate on a copy of `model` in its last stage, on `device`, for a run
    that trains on `train_images` images in all."""
    copied = stage_copy(cfg, model, head_name, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = Bench(copied, device, cfg.data.image_size)
        result = measure(bench, options, cfg.data.batch_size, BUDGET_S, train_images)
    del copied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def worth_compiling(eager: Measured, work: Workload) -> bool:
    """Whether to time torch.compile at all: it costs a compile (tens of seconds), so only a run
    long enough that the time would be small beside it is worth the try; the answer is cached."""
    return work.full_images / eager.train * COMPILE_SHARE >= COMPILE_GUESS_S


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


def measure(bench: Bench, options: list[Candidate], batch: int, budget: float, train_images: int) -> Calibration:
    """Each candidate once (a warm-up, then timed), then the close ones again while time is left.

    A run too short to pay for timing them all (`RUN_SHARE` of its estimated length) times the
    first candidate only: the seed loop's numerics, fp32 contiguous.
    """
    started = time.perf_counter()
    probe = fit_batch(bench, options[0], batch, len(options), budget, train_images)
    size = probe.size

    def left() -> float:
        return probe.budget - (time.perf_counter() - started)

    times: dict[Candidate, _Times] = {}
    for c in options[:1] if probe.short else options:
        if times and left() < 0:
            break  # over budget: the rest stay unmeasured rather than the run waiting
        if c == options[0] and probe.times is not None:
            times[c] = probe.times  # its first step at this size was the probe's
        else:
            times[c] = _Times(warm=bench.train_step(c, size))
            times[c].train.append(bench.train_step(c, size))
        bench.infer_step(c, size)
        times[c].infer.append(bench.infer_step(c, size))
    for _ in range(ROUNDS):
        best = max(size / min(t.train) for t in times.values())
        close = [c for c, t in times.items() if size / min(t.train) >= CLOSE * best]
        if len(close) < 2 or sum(min(times[c].train) + min(times[c].infer) for c in close) > left():
            break
        for c in close:
            times[c].train.append(bench.train_step(c, size))
            times[c].infer.append(bench.infer_step(c, size))
    measured = [t.measured(c, size) for c, t in times.items()]
    skipped = [c.label for c in options if c not in times]
    return Calibration(measured, size, time.perf_counter() - started, skipped, probe.short)


@dataclass
class _Probe:
    size: int  # the batch to measure at
    times: _Times | None  # the probed candidate's, if it was probed at `size`
    budget: float  # seconds this run may spend measuring
    short: bool  # the run is too short to pay for a first round


def fit_batch(bench: Bench, c: Candidate, batch: int, n: int, budget: float, train_images: int) -> _Probe:
    """The run's batch, or the largest smaller one whose first round of `n` candidates fits
    the budget: `budget`, or less for a short run, judged from the smallest batch's step.

    Grown from two by probing (a warm-up and a timed step at each size), since a step's cost
    per image falls with the batch on a GPU and a probe at the run's batch could take seconds
    on a CPU.
    """
    started, smallest = time.perf_counter(), min(MIN_BATCH, batch)
    size, probed = smallest, {}
    while True:
        probed[size] = _Times(warm=bench.train_step(c, size))
        probed[size].train.append(bench.train_step(c, size))
        per_image = max(probed[size].train[0] / size, 1e-9)
        if size == smallest:
            share = RUN_SHARE * per_image * train_images
            if share * FIRST_ROUND < n * STEP_COST * per_image * smallest:
                return _Probe(smallest, probed[smallest], share, short=True)
            budget = min(budget, share)
        remaining = budget * FIRST_ROUND - (time.perf_counter() - started)
        fits = max(smallest, min(batch, int(remaining / (n * STEP_COST * per_image))))
        if fits < 2 * size:
            return _Probe(fits, probed.get(fits), budget, short=False)
        size = fits
