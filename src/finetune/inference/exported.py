"""Reading a model written by `finetune export`: the model file, run by onnxruntime or
TorchScript, and its preprocessing contract, the JSON file beside it.

Export (for its parity check) and predict both read exported models; this module is what
they share, so neither imports the other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError


def contract_path(exported: Path) -> Path:
    return exported.with_name(exported.name + ".json")


def read_contract(exported: Path) -> dict[str, Any]:
    path = contract_path(exported)
    if not path.is_file():
        raise FinetuneError(f"{path} is missing; finetune export writes it beside {exported.name}, export again")
    return json.loads(path.read_text())


class ExportedModel:
    """An exported file called like the model: float32 NCHW batch in, logits out. The file
    is loaded once (an onnxruntime session or a TorchScript module), not per batch."""

    def __init__(self, path: Path):
        self.onnx = path.suffix == ".onnx"
        if self.onnx:
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        else:
            with _quiet_jit():
                self.module = torch.jit.load(str(path), map_location="cpu")

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.float().contiguous()
        if self.onnx:
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        with torch.no_grad(), _quiet_jit():
            return self.module(x)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is what was asked for: its deprecation warnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit")
        yield
