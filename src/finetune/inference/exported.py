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
    """An exported file called like the model: float32 NCHW batch in, logits out (a multilabel
    export's first output; its second, the probabilities, is for other readers). The file
    is loaded once (an onnxruntime session or a TorchScript module), not per batch."""

    def __init__(self, path: Path):
        self.onnx = path.suffix == ".onnx"
        if self.onnx:
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            images = self.session.get_inputs()[0]
            self.input_name = images.name
            self.batch = images.shape[0] if isinstance(images.shape[0], int) else None  # `--batch N`: only N fit
        else:
            with _quiet_jit():
                self.module = torch.jit.load(str(path), map_location="cpu")

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.float().contiguous()
        if not self.onnx:
            with torch.no_grad(), _quiet_jit():
                out = self.module(x)
            return out[0] if isinstance(out, tuple) else out
        if self.batch is None:
            return self._run(x)
        return torch.cat([self._run(_padded(chunk, self.batch))[: len(chunk)] for chunk in x.split(self.batch)])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.contiguous().numpy()})[0])


def _padded(chunk: torch.Tensor, size: int) -> torch.Tensor:
    """`chunk` with zero images after it up to `size` rows; in eval mode no row sees another."""
    return torch.cat([chunk, chunk.new_zeros(size - len(chunk), *chunk.shape[1:])])


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is what was asked for: its deprecation warnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit")
        yield
