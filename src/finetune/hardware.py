"""Pick the device and numeric precision, detecting what the hardware does natively."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from finetune.errors import FinetuneError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    memory_format: str = "channels_last"  # channels_last | contiguous

    @property
    def layout(self) -> torch.memory_format:
        return LAYOUTS[self.memory_format]

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Only fp16 needs loss scaling; a disabled scaler is a pass-through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> str:
        return f"{self.device} {self.precision} {self.memory_format}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"device = {name}: no CUDA GPU is visible here; use device: auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FinetuneError(f"device = {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FinetuneError(f"device = {name}: MPS is not available here; use device: auto or cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 matmuls run faster than fp32, not emulated."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return precision_for("cuda", torch.cuda.is_bf16_supported(including_emulation=False))
    return precision_for(device.type, device.type == "cpu" and cpu_has_native_bf16())


def precision_for(device_type: str, native_bf16: bool) -> str:
    """bf16 where the hardware runs it natively; else fp16 with a grad scaler on CUDA, fp32 elsewhere."""
    if native_bf16:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


def has_depthwise(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels for m in model.modules())


def auto_memory_format(device: torch.device, depthwise: bool) -> str:
    """channels_last, except for models with depthwise convolutions on CUDA.

    Measured on an H200 (shared/perf/gpu-2026-11-28.md, batch 32, 224 px): cuDNN's depthwise
    kernels in channels_last pay seconds of set-up for every new input shape (MobileNetV2 bf16:
    first step 7.8 s vs 0.9 s contiguous, the short last batch 9.7 s vs 0.25 s) and step slower
    (1,098 vs 1,440 img/s); ResNet18 runs alike in both. On CPU oneDNN prefers channels_last.
    """
    return "contiguous" if device.type == "cuda" and depthwise else "channels_last"


def memory_format_for(setting: str, device: torch.device, model: nn.Module) -> str:
    """`train.memory_format`, with `auto` decided by `auto_memory_format`."""
    return auto_memory_format(device, has_depthwise(model)) if setting == "auto" else setting


def resolve_runtime(device_name: str, precision: str) -> Runtime:
    device = resolve_device(device_name)
    chosen = auto_precision(device) if precision == "auto" else precision
    if chosen == "fp16" and device.type == "cpu":
        raise FinetuneError("precision = fp16 is not supported on CPU; use auto, bf16 or fp32")
    return Runtime(device, chosen)
