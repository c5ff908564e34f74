"""The runtime of a run: device, precision (training and inference), memory format and LR scale.

One function, `resolve_runtime`, answers for `plan` and `train` alike, since two answers to
this question are where they disagreed (issue 15, bug 5). `auto` is decided by measuring the
run's model (calibrate.py) unless a recorded choice (resume), the config or the cache already
answers; `plan` never measures: it shows the cached choice or says it will be measured.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.model.schedule import Schedule
from finetune.runtime import calibration_cache
from finetune.runtime.calibrate import Calibration, calibrate, measure_compiled, run_threads, worth_compiling
from finetune.runtime.candidates import (
    DTYPES,
    LAYOUTS,
    Candidate,
    Choice,
    Measured,
    Workload,
    autocast,
    candidates,
    choose,
    only_choice,
)
from finetune.runtime.distributed import SINGLE, Ranks, from_main
from finetune.runtime.hardware import device_name, has_depthwise, native_precisions, resolve_device

PENDING = Choice("fp32", "fp32", "channels_last")  # what plan sizes by until train has measured
SHORT_RUN_STEPS = 10  # train steps a candidate below which measuring (about 4 a candidate) costs more than it can save


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16: the train step's autocast
    memory_format: str = "channels_last"  # channels_last | contiguous
    infer_precision: str = ""  # evaluation and feature-cache extraction; "" = as `precision`
    lr_scale: float = 1.0  # the number of processes with train.scale_lr linear, else 1
    decided_by: str = "config"  # config | default (a short run) | measured | cached | recorded | pending (plan)
    calibration: Calibration | None = None
    compile: bool = False  # torch.compile the train step (train.compile, or measured to pay back)

    def __post_init__(self) -> None:
        self.infer_precision = self.infer_precision or self.precision

    @property
    def layout(self) -> torch.memory_format:
        return LAYOUTS[self.memory_format]

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    @property
    def infer_dtype(self) -> torch.dtype | None:
        return DTYPES[self.infer_precision]

    def autocast(self, inference: bool = False) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.infer_precision if inference else self.precision)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Only fp16 needs loss scaling; a disabled scaler is a pass-through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def numerics(self) -> str:
        """What the numbers computed depend on (the head-input cache is keyed by it); compile is not:
        extraction runs eager."""
        infer = f" (inference {self.infer_precision})" if self.infer_precision != self.precision else ""
        return f"{self.device} {self.precision} {self.memory_format}{infer}"

    def describe(self) -> str:
        return self.numerics + (" compiled" if self.compile else "")

    def record(self) -> dict[str, Any]:
        """The choice and what it was decided from, for last.pt (resume keeps it) and summary.json."""
        record = {
            "precision": self.precision,
            "infer_precision": self.infer_precision,
            "memory_format": self.memory_format,
            "compile": self.compile,
            "lr_scale": self.lr_scale,
            "decided_by": self.decided_by,
        }
        return {**record, "calibration": asdict(self.calibration) if self.calibration else None}

    def note(self) -> str:
        """One line: the choice, how it was decided and the measured rates."""
        scale = f"; LRs x{self.lr_scale:g} (train.scale_lr linear)" if self.lr_scale != 1 else ""
        if self.decided_by == "pending":
            return (
                f"runtime: {self.device}, precision/memory format measured when train starts (once per machine, "
                f"model, size and batch; a short run takes the stable default); sized here as {self.describe()}{scale}"
            )
        how = {
            "config": "set in the config",
            "recorded": "kept from last.pt",
            "cached": "measured earlier on this machine (`finetune calibrate CONFIG` measures again)",
            "measured": "measured now, kept for the next runs",
            "default": "the stable default: a run this short would not win back measuring (`finetune calibrate CONFIG` "
            "measures this model once, for every later run)",
        }[self.decided_by]
        line = f"runtime: {self.describe()}, {how}{scale}"
        return line if self.calibration is None else f"{line} {_rates(self.calibration)}"


def _rates(c: Calibration) -> str:
    """The measured rates; on a busy CPU those of one core (calibrate.py's docstring says why)."""
    train = ", ".join(f"{m.label} {m.train:.1f}" for m in c.measured)
    infer = ", ".join(f"{m.label} {m.infer:.1f}" for m in c.measured if not m.compiled)
    compiled = [m for m in c.measured if m.compiled]
    if compiled:
        infer += "; torch.compile failed here" if compiled[0].failed else f"; compiling took {compiled[0].setup:.0f} s"
    unit = f"img/s (one core's x {c.threads} threads: the machine was busy)" if c.one_core else "img/s"
    return f"(in {c.seconds:.1f} s, {c.rounds} rounds at batch {c.batch}); {unit} train: {train}; inference: {infer}"


@dataclass
class Subject:
    """What the run trains: its model (weightless for plan), head and images per epoch."""

    model: nn.Module
    head_name: str
    n_train: int
    n_val: int


def resolve_runtime(
    cfg: Config,
    subject: Subject | None = None,
    ranks: Ranks = SINGLE,
    recorded: dict[str, Any] | None = None,
    measure: bool = True,
) -> Runtime:
    """The run's runtime: the config's pins, then a recorded choice, the cache, a measurement.

    Without `subject` or with `measure` false (plan), nothing is measured: an `auto` that the
    cache cannot answer comes back `pending`. Under torchrun rank 0 decides for every rank.
    """
    device = resolve_device(cfg.device)
    if device.type == "cuda" and ranks.many:
        device = torch.device("cuda", ranks.local_rank)
    check_precision(cfg.precision, device)
    lr_scale = float(ranks.world) if cfg.train.scale_lr == "linear" else 1.0
    choice, how, rates = _decide(cfg, device, subject, ranks, recorded, measure)
    if cfg.train.compile != "auto":
        choice = replace(choice, compile=cfg.train.compile == "on")
    runtime = Runtime(
        device, choice.precision, choice.memory_format, choice.infer_precision, lr_scale, how, rates, choice.compile
    )
    if measure and how != "config":
        print(runtime.note())
    return runtime


def _decide(
    cfg: Config,
    device: torch.device,
    subject: Subject | None,
    ranks: Ranks,
    recorded: dict[str, Any] | None,
    measure: bool,
) -> tuple[Choice, str, Calibration | None]:
    """(choice, how it was decided, the rates it was decided from)."""
    options = candidates(cfg.precision, cfg.train.memory_format, native_precisions(device))
    pinned = only_choice(options)
    if pinned is not None:
        return pinned, "config", None
    if recorded is not None:
        kept = _kept(cfg, recorded)
        check_precision(kept.precision, device)
        saved = recorded.get("calibration")
        return kept, "recorded", Calibration.from_dict(saved) if saved else None
    if subject is None:
        return _pending(cfg), "pending", None
    work = workload(cfg, subject, ranks)
    key = calibration_key(cfg, subject, device, [c.label for c in options])
    short = is_short(work, options, cfg.data.batch_size)
    if not measure:  # plan, in one process
        calibration, how = calibration_cache.load(key), "cached"
    elif short:  # rank 0 reads for every rank: a run elsewhere may write the cache meanwhile
        calibration, how = from_main(calibration_cache.load(key) if ranks.main else None, ranks), "cached"
    else:
        calibration, how = from_main(
            _find_or_measure(cfg, subject, device, options, key, work) if ranks.main else None, ranks
        )
    if calibration is None and short:
        return Choice(options[0].precision, options[0].precision, options[0].memory_format), "default", None
    if calibration is None:
        return _pending(cfg), "pending", None
    return choose(calibration.measured, work), how, calibration


def is_short(work: Workload, options: list[Candidate], batch: int) -> bool:
    """Too short to win back measuring (about four steps a candidate): it takes the choice made
    for its key earlier (`finetune calibrate`, a longer run), else the stable default, and never
    measures. Counted in images, not timed, so the same config is short on any machine and load."""
    return len(options) > 1 and work.train_images < SHORT_RUN_STEPS * len(options) * batch


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type == "cpu":
        raise FinetuneError("precision = fp16 is not supported on CPU; use auto, bf16 or fp32")


def calibration_key(cfg: Config, subject: Subject, device: torch.device, labels: list[str]) -> dict[str, Any]:
    """What measured rates depend on: the machine, torch, the model, its input and what trains."""
    schedule = Schedule(cfg.train, subject.model, subject.head_name, steps_per_epoch=1)
    return {
        "device": device_name(device),
        "threads": run_threads(device),  # a CPU's one-core rates are recorded times these
        "torch": torch.__version__,
        "arch": cfg.model.arch,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size,
        "trains": sorted(m for g in schedule.groups for m in g.modules),  # the heaviest stage: all joined
        "freeze_bn": cfg.train.freeze_bn,
        "candidates": labels,
        "method": 5,  # undisturbed steps on the run's threads, else one core: earlier rates are measured again
    }


def workload(cfg: Config, subject: Subject, ranks: Ranks) -> Workload:
    """Images per process over the whole run: every epoch trains and evaluates. Epochs on the
    whole forward (no cached cut; a stage waiting for a plateau counted as not started) are
    those torch.compile would speed up."""
    per_rank = [math.ceil(n / ranks.world) for n in (subject.n_train, subject.n_val)]
    schedule = Schedule(cfg.train, subject.model, subject.head_name, steps_per_epoch=1)
    augmented = cfg.data.augment.active  # augmentation runs every image through the whole model
    full = [e for e in range(1, cfg.train.epochs + 1) if augmented or schedule.cache_cut(e) is None]
    stages = len({schedule.stage(e) for e in full})
    return Workload(cfg.train.epochs * per_rank[0], cfg.train.epochs * per_rank[1], 2, len(full) * per_rank[0], stages)


def inference_runtime(device: str, precision: str, model: nn.Module) -> Runtime:
    """predict/eval of a saved model: fp32 unless pinned (exact, nothing to measure for a one-off);
    contiguous for depthwise models on CUDA, whose channels_last kernels pay seconds per shape."""
    resolved = resolve_device(device)
    chosen = "fp32" if precision == "auto" else precision
    check_precision(chosen, resolved)
    fmt = "contiguous" if resolved.type == "cuda" and has_depthwise(model) else "channels_last"
    return Runtime(resolved, chosen, fmt)


def _find_or_measure(
    cfg: Config,
    subject: Subject,
    device: torch.device,
    options: list[Candidate],
    key: dict[str, Any],
    work: Workload,
    again: bool = False,
) -> tuple[Calibration, str]:
    """The cached rates for `key`, else (or `again`) measured now and cached: the choice is made
    once per key and kept, so every later run of it trains with the same numerics."""
    calibration, how = (None if again else calibration_cache.load(key)), "cached"
    if calibration is None:
        calibration, how = calibrate(cfg, subject.model, subject.head_name, device, options), "measured"
    eager = _train_rate(calibration, work)
    timed = any(m.compiled and m.candidate == eager.candidate for m in calibration.measured)
    if cfg.train.compile == "auto" and not timed and worth_compiling(work, device):
        compiled = measure_compiled(cfg, subject.model, subject.head_name, device, eager, calibration)
        calibration.measured.append(compiled)
        how = "measured"
    if how == "measured":
        calibration_cache.save(key, calibration)
    return calibration, how


def _train_rate(calibration: Calibration, work: Workload) -> Measured:
    """The measured rate of the train step `choose` picks."""
    chosen = choose(calibration.measured, work)
    return next(
        m
        for m in calibration.measured
        if not m.compiled and (m.precision, m.memory_format) == (chosen.precision, chosen.memory_format)
    )


def _pending(cfg: Config) -> Choice:
    """fp32 unless pinned: the widest activations, so plan's feature-cache sizes are not too small."""
    precision = PENDING.precision if cfg.precision == "auto" else cfg.precision
    fmt = PENDING.memory_format if cfg.train.memory_format == "auto" else cfg.train.memory_format
    return Choice(precision, precision, fmt)


def _kept(cfg: Config, recorded: dict[str, Any]) -> Choice:
    """The recorded choice, where the config does not pin it now."""
    precision = recorded["precision"] if cfg.precision == "auto" else cfg.precision
    infer = recorded.get("infer_precision", precision) if cfg.precision == "auto" else cfg.precision
    fmt = recorded["memory_format"] if cfg.train.memory_format == "auto" else cfg.train.memory_format
    return Choice(precision, infer, fmt, recorded.get("compile", False))


def calibrate_again(cfg: Config, subject: Subject) -> Runtime:
    """`finetune calibrate`: measure the config's candidates now and keep the rates in place of
    any earlier ones, so every later run of this key trains with the new choice."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    options = candidates(cfg.precision, cfg.train.memory_format, native_precisions(device))
    if only_choice(options) is not None:
        raise FinetuneError(
            f"precision = {cfg.precision} and train.memory_format = {cfg.train.memory_format} are both pinned: "
            "nothing to measure; set either to auto"
        )
    work = workload(cfg, subject, SINGLE)
    key = calibration_key(cfg, subject, device, [c.label for c in options])
    calibration, _ = _find_or_measure(cfg, subject, device, options, key, work, again=True)
    chosen = choose(calibration.measured, work)
    return Runtime(
        device,
        chosen.precision,
        chosen.memory_format,
        chosen.infer_precision,
        1.0,
        "measured",
        calibration,
        chosen.compile,
    )
