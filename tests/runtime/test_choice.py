"""The runtime choice from given rates (issue 16): no timing here, so nothing here is noisy."""

from __future__ import annotations

import pytest

from finetune.runtime.candidates import Candidate, Choice, Measured, Workload, candidates, choose, only_choice

RUN = Workload(train_images=3 * 3000, infer_images=3 * 800)


def test_the_fastest_train_step_wins_even_where_bf16_is_native():
    """The issue's Xeon (AVX512-BF16, no AMX): ResNet18 trains fastest in fp32 channels_last."""
    measured = [
        Measured("fp32", "channels_last", train=19.0, infer=49.5),
        Measured("fp32", "contiguous", train=13.9, infer=40.0),
        Measured("bf16", "channels_last", train=12.3, infer=28.1),
        Measured("bf16", "contiguous", train=10.0, infer=25.0),
    ]
    assert choose(measured, RUN) == Choice("fp32", "fp32", "channels_last")


def test_a_depthwise_model_on_a_gpu_runs_fp32_contiguous():
    """The H200's MobileNetV2 train rates and first-step costs (shared/perf/gpu-2026-11-28.md);
    the inference rates are made up, bf16 ahead by 6%: within the noise, so fp32 as trained."""
    measured = [
        Measured("bf16", "channels_last", train=1098, infer=3000, setup=7.8),
        Measured("bf16", "contiguous", train=1440, infer=3500, setup=0.87),
        Measured("fp32", "channels_last", train=1480, infer=3200, setup=5.3),
        Measured("fp32", "contiguous", train=1674, infer=3300, setup=0.64),
    ]
    assert choose(measured, RUN) == Choice("fp32", "fp32", "contiguous")


def test_inference_may_take_another_precision_than_training():
    measured = [
        Measured("fp32", "channels_last", train=100, infer=300),
        Measured("bf16", "channels_last", train=80, infer=600),
    ]
    evaluated = Workload(train_images=9000, infer_images=27_000)  # most time in evaluation and extraction
    assert choose(measured, evaluated) == Choice("fp32", "bf16", "channels_last")


def test_set_up_cost_counts_for_a_short_run_and_not_for_a_long_one():
    """A candidate whose first step at each shape costs seconds pays off only over enough steps."""
    measured = [
        Measured("fp32", "channels_last", train=120, infer=400, setup=10.0),
        Measured("fp32", "contiguous", train=100, infer=400, setup=0.0),
    ]
    short, long = Workload(1000, 100), Workload(100_000, 100)
    assert choose(measured, short).memory_format == "contiguous"
    assert choose(measured, long).memory_format == "channels_last"


def test_the_format_is_one_for_both_paths_and_chosen_by_their_sum():
    """channels_last trains faster but evaluates much slower: with much evaluation
    in the run, contiguous finishes first."""
    measured = [
        Measured("fp32", "channels_last", train=130, infer=100),
        Measured("fp32", "contiguous", train=100, infer=400),
    ]
    assert choose(measured, Workload(10_000, 10_000)).memory_format == "contiguous"
    assert choose(measured, Workload(10_000, 10)).memory_format == "channels_last"


def test_candidates_follow_the_device_and_the_pins():
    assert candidates("auto", "auto", ["fp32"]) == [Candidate("fp32", "contiguous"), Candidate("fp32", "channels_last")]
    assert [c.label for c in candidates("auto", "contiguous", ["fp32", "bf16", "fp16"])] == [
        "fp32 contiguous",
        "bf16 contiguous",
        "fp16 contiguous",
    ]
    assert {c.precision for c in candidates("bf16", "auto", ["fp32"])} == {"bf16"}, "a pinned precision is kept"


@pytest.mark.parametrize(("precision", "fmt", "pinned"), [("fp32", "contiguous", True), ("fp32", "auto", False)])
def test_only_a_fully_pinned_config_skips_measuring(precision, fmt, pinned):
    choice = only_choice(candidates(precision, fmt, ["fp32", "bf16"]))
    assert (choice == Choice(precision, precision, fmt)) if pinned else choice is None


def test_nothing_measured_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="nothing was measured"):
        choose([], RUN)


def test_torch_compile_is_chosen_only_where_its_faster_steps_win_back_every_compile():
    """This CPU's ResNet18 at 224 px: eager bf16 channels_last 63.6 img/s, compiled 45.6 after a
    30 s compile (never worth it); a GPU-like 1.5x faster compiled step pays only over enough
    whole-forward images, and a compile per shape and per stage counts against it."""
    eager = Measured("bf16", "channels_last", train=63.6, infer=200)
    slower = Measured("bf16", "channels_last", train=45.6, infer=200, setup=30.0, compiled=True)
    faster = Measured("bf16", "channels_last", train=95.4, infer=200, setup=30.0, compiled=True)
    long = Workload(100_000, 10_000, full_images=100_000, stages=1)
    assert not choose([eager, slower], long).compile
    assert choose([eager, faster], long) == Choice("bf16", "bf16", "channels_last", compile=True)
    assert not choose([eager, faster], Workload(9000, 2400, full_images=9000)).compile  # 47 s saved, 60 s compiling
    many_stages = Workload(100_000, 10_000, full_images=20_000, stages=4)  # 105 s saved, 240 s compiling
    assert not choose([eager, faster], many_stages).compile
    head_only = Workload(100_000, 10_000, full_images=0)  # every epoch on a cached cut
    assert not choose([eager, faster], head_only).compile


def test_torch_compile_is_timed_only_for_a_run_long_enough_to_risk_a_compile():
    """Counted in images: no rate (which load slows) enters the decision."""
    import torch

    from finetune.runtime.calibrate import COMPILE_IMAGES, worth_compiling

    cpu, enough = torch.device("cpu"), COMPILE_IMAGES["cpu"]
    assert worth_compiling(Workload(enough, 0, full_images=enough), cpu)
    assert not worth_compiling(Workload(enough, 0, full_images=enough // 2), cpu)
    assert not worth_compiling(Workload(enough, 0, full_images=enough), torch.device("cuda"))


@pytest.mark.parametrize("reverse", [False, True])
def test_a_difference_within_the_noise_goes_to_the_stable_order_however_it_was_measured(reverse):
    """bf16 channels_last measured 8% faster over the run is a tie: another measurement could
    rank them the other way, so fp32 contiguous wins it, whatever order the rates came in."""
    measured = [
        Measured("fp32", "contiguous", train=100, infer=300),
        Measured("bf16", "channels_last", train=108, infer=324),
    ]
    assert choose(measured[::-1] if reverse else measured, RUN) == Choice("fp32", "fp32", "contiguous")
    clear = [measured[0], Measured("bf16", "channels_last", train=150, infer=450)]
    assert choose(clear, RUN) == Choice("bf16", "bf16", "channels_last"), "1.5x is no tie"
