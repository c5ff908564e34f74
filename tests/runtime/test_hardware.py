"""Device facts: what the device runs, and the name its measurements are cached under."""

from __future__ import annotations

import json

import torch
import torchvision

from finetune.runtime.hardware import device_name, has_depthwise, native_precisions

CPU = torch.device("cpu")


def test_depthwise_convolutions_are_recognised():
    assert has_depthwise(torchvision.models.mobilenet_v2())
    assert not has_depthwise(torchvision.models.resnet18())


def test_the_cpu_times_fp32_first_and_never_fp16():
    precisions = native_precisions(CPU)
    assert precisions[0] == "fp32" and "fp16" not in precisions


def test_the_cpu_name_changes_with_the_threads_that_set_its_rates():
    threads = torch.get_num_threads()
    try:
        named = device_name(CPU)
        torch.set_num_threads(threads + 1)
        assert device_name(CPU) != named
    finally:
        torch.set_num_threads(threads)


def test_summary_records_the_memory_format(config_file, tmp_path):
    from finetune.cli import main

    run = tmp_path / "run"
    sets = ["train.epochs=2", "train.memory_format=contiguous"]
    assert main(["train", str(config_file()), "--run-dir", str(run), "--set", *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["precision"], summary["memory_format"]) == ("fp32", "contiguous")
