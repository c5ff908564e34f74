"""Pick the device and numeric precision, detecting what the hardware does natively."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from finetune.errors import FinetuneError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

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
        return f"{self.device} {self.precision}"


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
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def resolve_runtime(device_name: str, precision: str) -> Runtime:
    device = resolve_device(device_name)
    chosen = auto_precision(device) if precision == "auto" else precision
    if chosen == "fp16" and device.type == "cpu":
        raise FinetuneError("precision = fp16 is not supported on CPU; use auto, bf16 or fp32")
    return Runtime(device, chosen)
