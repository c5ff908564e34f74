"""One runtime for plan and train (issue 15, bug 5) and `auto` decided by measurement (issue 16).

The choice itself is tested from given rates (test_choice.py); here: when measuring happens
and when it must not, what it leaves behind, and that plan shows what train uses.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from finetune.config.load import apply_override, from_dict
from finetune.model.build import skeleton
from finetune.plan import make_plan
from finetune.runtime import calibrate as calibrate_module
from finetune.runtime import calibration_cache
from finetune.runtime import resolve as resolve_module
from finetune.runtime.calibrate import Bench, Calibration, measure, stage_copy
from finetune.runtime.candidates import Measured, Workload, candidates, choose
from finetune.runtime.distributed import Ranks
from finetune.runtime.hardware import native_precisions
from finetune.runtime.resolve import Subject, calibration_key, resolve_runtime

CPU = torch.device("cpu")
AUTO = ["precision=auto", "train.memory_format=auto"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def config(imagefolder, tmp_path):
    def make(*overrides: str):
        raw = tiny_config(imagefolder, tmp_path / "runs")
        for item in overrides:
            apply_override(raw, item)
        return from_dict(raw)

    return make


@pytest.fixture
def long_run(monkeypatch):
    """Runs of the tiny image folder measure as a long run would (see the short-run test)."""
    monkeypatch.setattr(resolve_module, "SHORT_RUN_STEPS", 0)


def subject_for(cfg, n_train: int = 24) -> Subject:
    built = skeleton(cfg.model, 3)
    return Subject(built.model, built.head_name, n_train, 12)


def cached_files(folder) -> list:
    return sorted(folder.rglob("*.json")) if folder.exists() else []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FINETUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration_cache.cache_dir() == tmp_path / "xdg" / "finetune"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "own"))
    assert calibration_cache.cache_dir() == tmp_path / "own"


def test_a_pinned_config_is_not_measured(cache, config):
    cfg = config("precision=fp32", "train.memory_format=contiguous")
    runtime = resolve_runtime(cfg, subject_for(cfg))
    assert (runtime.precision, runtime.memory_format, runtime.decided_by) == ("fp32", "contiguous", "config")
    assert cached_files(cache) == [] and runtime.calibration is None


def test_a_cached_measurement_answers_without_measuring(cache, config, long_run):
    cfg = config(*AUTO)
    subject = subject_for(cfg)
    options = candidates("auto", "auto", native_precisions(CPU))
    given = [Measured(c.precision, c.memory_format, train=10.0 + i, infer=50.0 - i) for i, c in enumerate(options)]
    key = calibration_key(cfg, subject, CPU, [c.label for c in options])
    calibration_cache.save(key, Calibration(given, batch=8, seconds=1.5))
    runtime = resolve_runtime(cfg, subject)
    assert runtime.decided_by == "cached" and runtime.calibration.measured == given, "the stored rates, not new ones"
    expected = choose(given, Workload(3 * 24, 3 * 12))
    assert (runtime.precision, runtime.infer_precision, runtime.memory_format) == (
        expected.precision,
        expected.infer_precision,
        expected.memory_format,
    )


def test_a_recorded_choice_is_kept_and_a_pin_still_wins(cache, config):
    recorded = {"precision": "bf16", "infer_precision": "fp32", "memory_format": "contiguous", "calibration": None}
    runtime = resolve_runtime(config(*AUTO), subject_for(config(*AUTO)), recorded=recorded)
    assert (runtime.precision, runtime.infer_precision, runtime.memory_format) == ("bf16", "fp32", "contiguous")
    assert runtime.decided_by == "recorded" and cached_files(cache) == []
    pinned = resolve_runtime(config("precision=fp32"), subject_for(config()), recorded=recorded)
    assert (pinned.precision, pinned.infer_precision, pinned.memory_format) == ("fp32", "fp32", "contiguous")


def test_a_record_round_trips(cache, config):
    cfg = config(*AUTO)
    first = resolve_runtime(cfg, subject_for(cfg))
    again = resolve_runtime(cfg, subject_for(cfg), recorded=json.loads(json.dumps(first.record())))
    assert again.describe() == first.describe() and again.calibration == first.calibration


def test_auto_measures_a_copy_once_then_reads_the_cache(cache, config, monkeypatch, long_run):
    cfg = config(*AUTO)
    subject = subject_for(cfg)
    model = subject.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads, modes, rng = (
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )
    measured = resolve_runtime(cfg, subject)
    assert measured.decided_by == "measured" and len(cached_files(cache)) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights and BatchNorm untouched"
    assert [p.requires_grad for p in model.parameters()] == grads and [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng), "the run draws the same numbers as without measuring"
    again = resolve_runtime(cfg, subject)
    assert again.decided_by == "cached" and again.describe() == measured.describe()
    head_only = config(*AUTO, "train.unfreeze_epoch=null")
    assert resolve_runtime(head_only, subject_for(head_only)).decided_by == "measured", "another trainable part"


def test_every_candidate_is_timed_at_the_run_batch_for_two_rounds_whatever_the_budget():
    """A budget spent (a busy machine) stops only the extra rounds: never a candidate left out,
    never a handful of images standing for a batch of 8."""
    cfg = from_dict(tiny_config("unused", "unused"))
    built = skeleton(cfg.model, 3)
    options = candidates("auto", "auto", native_precisions(CPU))
    result = measure(Bench(built.model, CPU, 32), options, batch=8, budget=0.0)
    assert [m.candidate for m in result.measured] == options and result.batch == 8 and result.rounds <= 2
    assert all(m.train > 0 and m.infer > 0 and m.setup >= 0 for m in result.measured)


def test_a_run_too_short_to_win_back_measuring_takes_the_kept_choice_or_the_stable_default(cache, config, monkeypatch):
    """24 images for 3 epochs: measuring would cost more than any choice saves. The rule counts
    images, so the run is short on any machine and load; it never measures, and takes the choice
    made for its key once (by `finetune calibrate` or a longer run), else the stable default."""
    cfg = config(*AUTO)
    runtime = resolve_runtime(cfg, subject_for(cfg))
    assert (runtime.precision, runtime.memory_format, runtime.decided_by) == ("fp32", "contiguous", "default")
    assert runtime.calibration is None and "finetune calibrate" in runtime.note()
    assert cached_files(cache) == []
    options = candidates("auto", "auto", native_precisions(CPU))
    given = [Measured(c.precision, c.memory_format, train=10.0 * (1 + i), infer=50.0) for i, c in enumerate(options)]
    key = calibration_key(cfg, subject_for(cfg), CPU, [c.label for c in options])
    calibration_cache.save(key, Calibration(given, batch=8, seconds=1.5))
    kept = resolve_runtime(cfg, subject_for(cfg))
    assert kept.decided_by == "cached" and kept.calibration.measured == given
    assert (kept.precision, kept.memory_format) == (options[-1].precision, options[-1].memory_format)


@pytest.mark.parametrize(
    ("sets", "trains"),
    [
        (["train.unfreeze_epoch=null"], {"fc"}),
        (["train.unfreeze_epoch=null", "train.unfreeze=[{epoch: 1, modules: [layer4]}]"], {"fc", "layer4"}),
    ],
)
def test_the_measured_copy_trains_as_the_last_stage_does(config, sets, trains):
    """The rates are those of the run's heaviest steps: gradients for the last stage's groups
    only (a head-only run's backward stops at the head); frozen BatchNorm in eval mode."""
    cfg = config(*AUTO, *sets)
    built = skeleton(cfg.model, 3)
    copied = stage_copy(cfg, built.model, built.head_name, CPU)
    assert {n.split(".")[0] for n, p in copied.named_parameters() if p.requires_grad} == trains
    assert copied.layer4[0].bn1.training == ("layer4" in trains) and not copied.layer1[0].bn1.training
    assert all(p.requires_grad for p in built.model.parameters()), "the run's own model is untouched"


def test_plan_says_train_will_measure_then_shows_what_train_chose(cache, config, tmp_path, monkeypatch, long_run):
    """Bug 5: plan and train resolve the runtime with one function, so after train measured,
    plan shows train's choice, and the columns that follow from it (LRs, feature cache) agree."""
    from finetune.training.session import Session

    cfg = config(*AUTO, "train.unfreeze_epoch=null", "train.unfreeze=[{epoch: 1, modules: [layer4]}]", "train.epochs=3")
    pending = make_plan(cfg)
    assert {e.runtime for e in pending.epochs} == {"measured by train"}
    assert "measured when train starts" in pending.runtime
    trainer = Session().prepare(cfg, tmp_path / "run")
    plan = make_plan(cfg)
    assert {e.runtime for e in plan.epochs} == {trainer.runtime.describe()}
    planner = trainer.features.planner
    for e in plan.epochs:
        first = (e.epoch - 1) * plan.steps_per_epoch
        assert e.cache == planner.decide(e.epoch).note
        assert e.lr_start == trainer.schedule.lrs(first) and e.stage == trainer.schedule.stage(e.epoch)


def test_scale_lr_multiplies_the_lrs_plan_shows_by_the_processes(cache, config):
    cfg = config("train.scale_lr=linear", "train.unfreeze_epoch=null")
    assert resolve_runtime(cfg, subject_for(cfg), Ranks(0, 4, 0), measure=False).lr_scale == 4
    one, two = make_plan(cfg), make_plan(cfg, Ranks(0, 2, 0))
    assert two.epochs[0].lr_start["head"] == pytest.approx(2 * one.epochs[0].lr_start["head"])
    assert "LRs x2" in two.runtime


def test_a_resumed_run_keeps_its_measured_choice_and_stays_exact(config_file, tmp_path, monkeypatch, long_run):
    """last.pt holds the choice: the resume uses it without measuring (a measurement now might
    choose otherwise), and the resumed run equals one that never stopped."""
    import pandas as pd

    from finetune.cli import main

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "first"))
    config = str(config_file(precision="fp32", train={"epochs": 3, "feature_cache": "off"}))  # the format is measured
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", config, "--run-dir", str(run), "--set", "train.epochs=2"]) == 0
    chosen = json.loads((run / "summary.json").read_text())["runtime"]
    assert chosen["decided_by"] == "measured"
    pinned = [f"train.memory_format={chosen['memory_format']}"]
    assert main(["train", config, "--run-dir", str(reference), "--set", *pinned]) == 0  # the same numerics
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "later"))
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3"]) == 0
    assert not (tmp_path / "later").exists(), "nothing measured on resume"
    summaries = [json.loads((r / "summary.json").read_text())["runtime"] for r in (reference, run)]
    assert summaries[1]["decided_by"] == "recorded"
    assert [{k: s[k] for k in ("precision", "infer_precision", "memory_format")} for s in summaries] == [
        {k: summaries[0][k] for k in ("precision", "infer_precision", "memory_format")}
    ] * 2
    results = [pd.read_csv(r / "results.csv").drop(columns="epoch_seconds") for r in (reference, run)]
    pd.testing.assert_frame_equal(results[0], results[1])
    weights = [torch.load(r / "last.pt", weights_only=True)["model"] for r in (reference, run)]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


def test_a_cached_compile_timing_decides_compile_and_a_record_or_pin_wins(cache, config, long_run):
    """The compiled step's rate and compile time sit in the calibration beside the eager rates;
    on the tiny run (epochs 2-3 on the whole forward) a 10x faster step after 0.1 s pays."""
    cfg = config(*AUTO)
    subject = subject_for(cfg)
    options = candidates("auto", "auto", native_precisions(CPU))
    given = [Measured(c.precision, c.memory_format, train=20.0 - i, infer=50.0) for i, c in enumerate(options)]
    fastest = given[0]
    compiled = Measured(fastest.precision, fastest.memory_format, train=100.0, infer=50.0, setup=0.1, compiled=True)
    key = calibration_key(cfg, subject, CPU, [c.label for c in options])
    calibration_cache.save(key, Calibration([*given, compiled], batch=8, seconds=1.5))
    runtime = resolve_runtime(cfg, subject)
    assert runtime.compile and runtime.describe().endswith("compiled")
    assert runtime.record()["compile"] and "compiling took 0 s" in runtime.note()
    assert not resolve_runtime(config(*AUTO, "train.compile=off"), subject).compile
    recorded = {"precision": "fp32", "memory_format": "contiguous", "compile": True, "calibration": None}
    assert resolve_runtime(cfg, subject, recorded=recorded).compile, "resume keeps the recorded choice"
    assert not resolve_runtime(config(*AUTO, "train.compile=off"), subject, recorded=recorded).compile
    failed = Measured(fastest.precision, fastest.memory_format, 20.0, 50.0, setup=float("inf"), compiled=True)
    calibration_cache.save(key, Calibration([*given, failed], batch=8, seconds=1.5))
    runtime = resolve_runtime(cfg, subject)
    assert not runtime.compile and "torch.compile failed here" in runtime.note(), "a failed compile is never chosen"


def test_a_run_too_short_to_measure_never_times_a_compile(cache, config, monkeypatch):
    """A short run is not measured at all: no compile timing either."""
    monkeypatch.setitem(calibrate_module.COMPILE_IMAGES, "cpu", 0)  # any measured run would try compiling
    cfg = config(*AUTO)
    runtime = resolve_runtime(cfg, subject_for(cfg))
    assert runtime.decided_by == "default" and runtime.calibration is None and not runtime.compile


def test_a_compiled_run_trains_as_the_eager_one_does(config_file, tmp_path):
    """train.compile: on compiles the whole forward's train step (here epochs 2 and 3; the head
    epoch trains on its cached inputs): the same losses to float tolerance, recorded as compiled."""
    import pandas as pd
    from torch._dynamo.utils import counters

    from finetune.cli import main

    config = str(config_file(train={"epochs": 3}))
    runs = {mode: tmp_path / mode for mode in ("on", "off")}
    for mode, run in runs.items():
        counters.clear()
        assert main(["train", config, "--run-dir", str(run), "--set", f"train.compile={mode}"]) == 0
        assert (counters["stats"]["unique_graphs"] > 0) == (mode == "on"), "dynamo compiled the step, and only then"
    summary = json.loads((runs["on"] / "summary.json").read_text())
    assert summary["runtime"]["compile"] is True
    results = [pd.read_csv(run / "results.csv") for run in runs.values()]
    columns = ["train_loss", "val_loss"]  # (12 val images: one near-tie flips val_acc)
    pd.testing.assert_frame_equal(
        results[0][columns], results[1][columns], atol=1e-2, rtol=0
    )  # fused kernels round otherwise


@contextlib.contextmanager
def busy(processes: int = 2):
    """Other work on the machine: processes spinning on the CPU until the block ends."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()


def apart(calibration: Calibration, factor: float = 1.5) -> bool:
    """Whether every two candidates' train and inference rates differ by `factor` or more."""
    rates = sorted((m.train, m.infer) for m in calibration.measured)
    return all(b[0] >= factor * a[0] and b[1] >= factor * a[1] for a, b in itertools.pairwise(rates))


SEPARATED = [  # fp32 against bf16 where the CPU has it: 1.7-1.9x apart at this size on an AVX512-BF16 EPYC
    "precision=auto",
    "train.memory_format=channels_last",
    "data.image_size=128",
    "data.batch_size=16",
]


def test_two_busy_processes_leave_the_choice_between_candidates_1_5x_apart_as_an_idle_machine_makes_it(config):
    """A step counts only where the run's threads had the cores to themselves, else every
    candidate is timed as one thread's CPU time: under load, wall time on two threads once
    ranked bf16 3x slower than fp32 (1.8x faster idle). The run's thread count is put back."""
    threads = torch.get_num_threads()
    cfg = config(*SEPARATED)
    built = skeleton(cfg.model, 3)
    options = candidates(cfg.precision, cfg.train.memory_format, native_precisions(CPU))
    work = Workload(10**5, 10**4)
    idle = measure(Bench(built.model, CPU, 128), options, 16, budget=0.0)
    if len(options) < 2 or not apart(idle):
        pytest.skip(f"no two candidates 1.5x apart on this CPU: {idle.measured}")
    with busy():
        loaded = measure(Bench(built.model, CPU, 128), options, 16, budget=0.0)
    assert choose(loaded.measured, work) == choose(idle.measured, work), (idle.measured, loaded.measured)
    assert torch.get_num_threads() == threads, "the run's threads are back"


def test_under_load_a_config_reads_its_kept_choice_and_trains_bit_identical_weights(config_file, tmp_path, monkeypatch):
    """The choice is measured once (idle) and kept: the run under load reads it and trains the
    same model bit for bit, decided_by `cached`."""
    from finetune.cli import main

    monkeypatch.setattr(resolve_module, "SHORT_RUN_STEPS", 0)  # the tiny run measures as a long one would
    config = str(config_file(train={"epochs": 2, "feature_cache": "off", "compile": "off"}))
    runs = []
    for name, load in (("idle", contextlib.nullcontext()), ("loaded", busy())):
        monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
        with load:
            assert main(["train", config, "--run-dir", str(tmp_path / name), "--set", *SEPARATED]) == 0
        runs.append(tmp_path / name)
    chosen = [json.loads((run / "summary.json").read_text())["runtime"] for run in runs]
    if not apart(Calibration.from_dict(chosen[0]["calibration"])):
        pytest.skip(f"no two candidates 1.5x apart on this CPU: {chosen[0]['calibration']['measured']}")
    assert [c["decided_by"] for c in chosen] == ["measured", "cached"]
    keys = ("precision", "infer_precision", "memory_format", "compile")
    assert {k: chosen[0][k] for k in keys} == {k: chosen[1][k] for k in keys}
    weights = [torch.load(run / "last.pt", weights_only=True)["model"] for run in runs]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
