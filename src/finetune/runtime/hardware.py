"""Facts about the device at hand: which it is, what it runs natively, and a name for it.

What runs fastest on it is not decided here: resolve.py measures that (issue 16), because a
rule written from one machine ("native bf16 -> bf16") was wrong on the next.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn

from finetune.errors import FinetuneError


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
    """AMX tiles or AVX512-BF16: bf16 runs in hardware rather than emulated (slow for sure)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_precisions(device: torch.device) -> list[str]:
    """The precisions worth timing on this device, fp32 first; fp16 needs a GPU here."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return ["fp32", *(["bf16"] if bf16 else []), "fp16"]
    if device.type == "mps":
        return ["fp32", "fp16"]
    return ["fp32", *(["bf16"] if cpu_has_native_bf16() else [])]


def has_depthwise(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels for m in model.modules())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer read next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """What makes measured rates differ between machines: the chip, its vector flags, threads."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    if device.type == "mps":
        return f"mps {platform.machine()}"
    flags = "+".join(f for f in ("amx_tile", "avx512_bf16", "avx512_fp16") if f in _cpu_flags())
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{_cpu_model()} {capability} {flags or 'no-bf16'} {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""
