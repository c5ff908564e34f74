"""Device-dependent choices, as pure functions of the device facts."""

from __future__ import annotations

import torch
import torchvision

from finetune.hardware import auto_memory_format, has_depthwise, memory_format_for, precision_for

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_follows_native_bf16():
    assert precision_for("cuda", native_bf16=True) == "bf16"
    assert precision_for("cuda", native_bf16=False) == "fp16"
    assert precision_for("cpu", native_bf16=True) == "bf16"
    assert precision_for("cpu", native_bf16=False) == "fp32"
    assert precision_for("mps", native_bf16=False) == "fp32"


def test_depthwise_models_run_contiguous_on_cuda_only():
    mobilenet, resnet = torchvision.models.mobilenet_v2(), torchvision.models.resnet18()
    assert has_depthwise(mobilenet) and not has_depthwise(resnet)
    assert auto_memory_format(CUDA, depthwise=True) == "contiguous"
    assert auto_memory_format(CUDA, depthwise=False) == "channels_last"
    assert auto_memory_format(CPU, depthwise=True) == "channels_last"
    assert memory_format_for("auto", CUDA, mobilenet) == "contiguous"
    assert memory_format_for("auto", CUDA, resnet) == "channels_last"
    assert memory_format_for("channels_last", CUDA, mobilenet) == "channels_last", "an explicit choice wins"


def test_summary_records_the_memory_format(config_file, tmp_path):
    import json

    from finetune.cli import main

    run = tmp_path / "run"
    sets = ["train.epochs=2", "train.memory_format=contiguous"]
    assert main(["train", str(config_file()), "--run-dir", str(run), "--set", *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["precision"], summary["memory_format"]) == ("fp32", "contiguous")
