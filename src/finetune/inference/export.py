"""`finetune export`: a checkpoint's model as ONNX or TorchScript, its preprocessing contract in
a JSON file beside it, and a check that the exported model gives PyTorch's logits on a batch
of the run's own validation images. A multilabel model has a second output, the sigmoid
probabilities, and its contract carries the label names and per-label thresholds. onnx,
onnxscript and onnxruntime are an optional extra."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from finetune.data.sources import load_data
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.inference.exported import ExportedModel, contract_path
from finetune.inference.labels import saved_thresholds
from finetune.inference.predict import checkpoint_config, predictor_from
from finetune.runs.checkpoint import checkpoint_file, load_checkpoint

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-3  # largest absolute logit difference accepted (fp32 on CPU)
CHECK_IMAGES = 8


def export(
    path: str | Path, fmt: str, out: Path | None, batch: str, overrides: list[str], tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Write the exported model and its contract; return what was written and the parity check.

    Both are written to a temp folder beside `out` and the model is checked there: only a model
    that passes is renamed into place, its contract after it, so a failed export leaves any
    earlier model and contract as they were, and no model without its contract.
    """
    ckpt_path = checkpoint_file(path)
    ckpt = load_checkpoint(ckpt_path)
    fixed = _batch_size(batch)
    predictor = predictor_from(ckpt, "cpu", "fp32")
    model = predictor.model.to(memory_format=torch.contiguous_format)
    images = _check_batch(ckpt, overrides, predictor)
    if fixed:  # the check runs at the fixed size; a dynamic model is checked at another than it was traced at
        images = images.repeat((fixed + len(images) - 1) // len(images), 1, 1, 1)[:fixed]
    out = out or ckpt_path.with_name(ckpt_path.stem + SUFFIXES[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staged = Path(staging) / out.name
        written = WithProbabilities(model).eval() if _multilabel(ckpt) else model
        _write_model(written, images if fixed else images[:2], staged, fmt, dynamic=fixed is None)
        diff = _parity(model, staged, images)
        if diff > tolerance:
            other = next(f for f in SUFFIXES if f != fmt)
            raise FinetuneError(
                f"export: {out} would give logits up to {diff:.2g} away from PyTorch's (over {tolerance}); "
                f"nothing was written, try --format {other}"
            )
        atomic_write_text(contract_path(staged), json.dumps(_contract(ckpt, fmt, fixed), indent=2) + "\n")
        _fsync(staged)
        os.replace(staged, out)
        os.replace(contract_path(staged), contract_path(out))
    return {"file": str(out), "contract": str(contract_path(out)), "max_abs_diff": diff, "images": len(images)}


class WithProbabilities(torch.nn.Module):
    """A multilabel model as exported: (logits, sigmoid probabilities)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.sigmoid(logits)


def _multilabel(ckpt: dict[str, Any]) -> bool:
    return ckpt.get("task", "multiclass") == "multilabel"


def export_for_tracking(run_dir: Path) -> list[Path]:
    """best.pt as ONNX beside it, and its contract: the model `tracking.mlflow.log_model` logs."""
    result = export(run_dir / "best.pt", "onnx", None, "dynamic", [])
    return [Path(result["file"]), Path(result["contract"])]


def _write_model(model: torch.nn.Module, example: torch.Tensor, out: Path, fmt: str, dynamic: bool) -> None:
    if fmt == "onnx":
        _onnx(model, example, out, dynamic)
    else:
        _torchscript(model, example, out)


def _parity(model: torch.nn.Module, exported: Path, images: torch.Tensor) -> float:
    """Largest absolute difference between the exported model's logits and PyTorch's."""
    with torch.inference_mode():
        expected = model(images)
    return float((ExportedModel(exported)(images) - expected).abs().max())


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _batch_size(batch: str) -> int | None:
    if batch == "dynamic":
        return None
    if batch.isdigit() and int(batch) > 0:
        return int(batch)
    raise FinetuneError(f"export --batch {batch!r}: use dynamic or a positive integer")


def _check_batch(ckpt: dict[str, Any], overrides: list[str], predictor) -> torch.Tensor:
    """A few of the run's validation images, preprocessed as in training."""
    cfg = checkpoint_config(ckpt, overrides)
    data = load_data(dataclasses.replace(cfg.data, train_size=1, val_size=CHECK_IMAGES), cfg.task == "multilabel")
    return predictor.transform(torch.cat(list(data.val.in_order(CHECK_IMAGES)))).contiguous()


def _onnx(model: torch.nn.Module, example: torch.Tensor, out: Path, dynamic: bool) -> None:
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise FinetuneError("export --format onnx: onnx is not installed; pip install 'finetune[export]'") from None
    shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic else None
    outputs = ["logits", "probabilities"] if isinstance(model, WithProbabilities) else ["logits"]
    program = torch.onnx.export(
        model, (example,), input_names=["images"], output_names=outputs, dynamic_shapes=shapes, dynamo=True
    )
    program.save(str(out))


def _torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit")  # TorchScript is what was asked for
        torch.jit.trace(model, example).save(str(out))


def _contract(ckpt: dict[str, Any], fmt: str, fixed: int | None) -> dict[str, Any]:
    contract = _base_contract(ckpt, fmt, fixed)
    if not _multilabel(ckpt):
        return contract
    batch, labels = fixed or "batch", len(ckpt["class_names"])
    return {
        **contract,
        "task": "multilabel",
        "output": {"name": "logits", "shape": [batch, labels]},
        "outputs": [
            {"name": "logits", "shape": [batch, labels]},
            {"name": "probabilities", "shape": [batch, labels], "meaning": "sigmoid(logits), one per label"},
        ],
        "thresholds": saved_thresholds(ckpt, "the checkpoint"),
        "prediction": "the labels whose probability is at or above their threshold (in class_names order)",
    }


def _base_contract(ckpt: dict[str, Any], fmt: str, fixed: int | None) -> dict[str, Any]:
    size = ckpt["image_size"]
    return {
        "format": fmt,
        "arch": ckpt["arch"],
        "input": {"name": "images", "shape": [fixed or "batch", 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [fixed or "batch", len(ckpt["class_names"])]},
        "preprocessing": {
            "image_size": size,
            "decode": "PIL: Image.draft('RGB', (image_size, image_size)), then convert('RGB')",
            "resize": "PIL: resize((image_size, image_size), Image.BILINEAR)",
            "scale": "RGB pixels / 255",
            "mean": list(ckpt["mean"]),
            "std": list(ckpt["std"]),
            "normalize": "(x - mean) / std per channel",
        },
        "class_names": list(ckpt["class_names"]),
        "epoch": ckpt["epoch"],
        "metrics": ckpt.get("metrics", {}),
    }
