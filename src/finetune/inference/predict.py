"""Use a trained checkpoint: rebuild its model, evaluate it on data, predict image files.

A checkpoint is self-describing (arch, classes, image size, normalization), so images are
preprocessed exactly as in training: decoded to uint8 at the image size by the same
`decode_file`, then normalized as a batch by the same BatchTransform. Test-time augmentation
(tta.py) averages the logits over views of each image before the softmax (a multilabel
model's sigmoid, whose labels at or above their thresholds are its prediction: labels.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import metrics
from torchvision.datasets.folder import IMG_EXTENSIONS

from finetune.config.load import apply_overrides, from_dict, saved_config
from finetune.config.schema import Config
from finetune.data.batching import BatchTransform
from finetune.data.decode import decode_file
from finetune.data.sources import DataSplits, load_data
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.inference.calibration import stored_temperature
from finetune.inference.calibration_multilabel import calibrated_thresholds
from finetune.inference.exported import ExportedModel, read_contract
from finetune.inference.labels import SUMMARY_KEYS as LABEL_SUMMARY_KEYS
from finetune.inference.labels import label_report, labels_above, thresholds_of, write_label_report
from finetune.inference.tta import tta_views
from finetune.model.build import rebuild
from finetune.runs.checkpoint import checkpoint_file, load_checkpoint
from finetune.runs.results import confusion_figure
from finetune.runtime.resolve import Runtime, inference_runtime

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass
class Predictor:
    model: Callable[[torch.Tensor], torch.Tensor]  # the model, or an exported file's runner
    class_names: list[str]
    transform: BatchTransform
    runtime: Runtime
    tta: str | None = None  # None, "flip" or "crops": see tta.py
    thresholds: list[float] | None = None  # a multilabel model's, one per label; None: multiclass
    temperature: float = 1.0  # logits are divided by it before the softmax (predict --calibrated)

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """float32 logits for inputs already resized and normalized."""
        with self.runtime.autocast(inference=True):
            return self.model(inputs).float()

    def batch_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain logits, logits averaged over the test-time views) of a uint8 batch; the same
        tensor twice without TTA."""
        inputs = self.transform(images)
        plain = self.logits(inputs)
        if self.tta is None:
            return plain, plain
        views = tta_views(self.tta, images, inputs, self.transform)
        logits = [plain if view is inputs else self.logits(view) for view in views]
        return plain, torch.stack(logits).mean(0)

    def outputs(self, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class (multilabel: label) probabilities of uint8 image batches without and with test-time augmentation."""
        pairs = [self.batch_logits(batch) for batch in batches]
        if not pairs:
            empty = torch.zeros(0, len(self.class_names))
            return empty, empty
        activate = torch.sigmoid if self.thresholds is not None else partial(torch.softmax, dim=1)
        plain, averaged = (activate(torch.cat(chunks) / self.temperature).cpu() for chunks in zip(*pairs, strict=True))
        return plain, averaged

    def probabilities(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Class probabilities of uint8 image batches, test-time augmented when `tta` is set."""
        return self.outputs(batches)[1]


def load_predictor(
    path: str | Path,
    device: str = "auto",
    precision: str = "auto",
    tta: str | None = None,
    threshold: float | None = None,
) -> Predictor:
    return predictor_from(load_checkpoint(checkpoint_file(path)), device, precision, tta, threshold)


def predictor_from(
    ckpt: dict[str, Any], device: str, precision: str, tta: str | None = None, threshold: float | None = None
) -> Predictor:
    model = rebuild(ckpt["arch"], len(ckpt["class_names"]), ckpt.get("torchvision_weights", False))
    model.load_state_dict(ckpt["model"])
    runtime = inference_runtime(device, precision, model)
    model = model.to(runtime.device, memory_format=runtime.layout).eval()
    transform = BatchTransform(
        ckpt["image_size"], tuple(ckpt["mean"]), tuple(ckpt["std"]), runtime.device, runtime.layout
    )
    thresholds = thresholds_of(ckpt, threshold, "the checkpoint")
    return Predictor(model, list(ckpt["class_names"]), transform, runtime, tta, thresholds)


def checkpoint_config(ckpt: dict[str, Any], overrides: list[str]) -> Config:
    """The run's config from a checkpoint, with `--set data.*`, device or precision applied."""
    for item in overrides:
        if not item.startswith(("data.", "device=", "precision=")):
            raise FinetuneError(f"--set {item}: only data.*, device and precision can be changed")
    raw = saved_config(ckpt["config"])
    apply_overrides(raw, overrides)
    return from_dict(raw, source="the checkpoint's config")


def exported_predictor(path: Path, tta: str | None = None, threshold: float | None = None) -> Predictor:
    """A predictor for an exported model, preprocessing as its contract JSON says."""
    contract = read_contract(path)
    prep = contract["preprocessing"]
    runtime = Runtime(torch.device("cpu"), "fp32", "contiguous")
    transform = BatchTransform(
        prep["image_size"], tuple(prep["mean"]), tuple(prep["std"]), runtime.device, runtime.layout
    )
    thresholds = thresholds_of(contract, threshold, str(path))
    return Predictor(ExportedModel(path), list(contract["class_names"]), transform, runtime, tta, thresholds)


# ---- eval --------------------------------------------------------------------------------
@dataclass
class ValOutputs:
    """Class probabilities for the validation images eval scores, without and with TTA."""

    probabilities: torch.Tensor
    tta_probabilities: torch.Tensor  # the same as `probabilities` without TTA
    labels: torch.Tensor
    class_names: list[str]
    thresholds: list[float] | None = None  # multilabel


def evaluate_checkpoint(
    path: str | Path, overrides: list[str], out: Path | None, tta: str | None = None, threshold: float | None = None
) -> dict[str, Any]:
    """Score a checkpoint on its run's validation data (or the data given by `--set data.*`);
    with TTA the report scores the augmented predictions and keeps the plain ones' summary."""
    ckpt_path = checkpoint_file(path)
    val = val_probabilities(load_checkpoint(ckpt_path), overrides, tta, threshold)
    out = out or ckpt_path.parent / f"eval-{ckpt_path.stem}"
    if val.thresholds is not None:
        return _evaluate_labels(val, tta, out)
    truth = val.labels.numpy()
    report = scores(truth, val.tta_probabilities.argmax(1).numpy(), val.class_names)
    report["tta"] = tta
    if tta is not None:
        plain = scores(truth, val.probabilities.argmax(1).numpy(), val.class_names)
        report["without_tta"] = {key: plain[key] for key in SUMMARY_KEYS}
    write_report(report, out)
    return report


def _evaluate_labels(val: ValOutputs, tta: str | None, out: Path) -> dict[str, Any]:
    """eval of a multilabel model: labels.py's report at the thresholds."""
    report = label_report(val.tta_probabilities, val.labels, val.class_names, val.thresholds)
    report["tta"] = tta
    if tta is not None:
        plain = label_report(val.probabilities, val.labels, val.class_names, val.thresholds)
        report["without_tta"] = {key: plain[key] for key in LABEL_SUMMARY_KEYS}
    write_label_report(report, out)
    return report


def val_probabilities(
    ckpt: dict[str, Any], overrides: list[str], tta: str | None = None, threshold: float | None = None
) -> ValOutputs:
    """Class probabilities for the validation images eval scores, their labels, the class names."""
    cfg = checkpoint_config(ckpt, overrides)
    predictor = predictor_from(ckpt, cfg.device, cfg.precision, tta, threshold)
    data = val_data(cfg, predictor.class_names)
    plain, averaged = predictor.outputs(data.val.in_order(64))
    return ValOutputs(plain, averaged, data.val.labels, predictor.class_names, predictor.thresholds)


def val_data(cfg: Config, class_names: list[str], command: str = "eval") -> DataSplits:
    """The config's data, refused when its classes are not the checkpoint's."""
    data = load_data(cfg.data, cfg.task == "multilabel")
    if data.class_names != class_names:
        raise FinetuneError(
            f"{command}: the data's classes ({', '.join(data.class_names)}) are not the checkpoint's "
            f"({', '.join(class_names)}); point data.root at data with the same class folders"
        )
    return data


def scores(truth: np.ndarray, preds: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    labels = list(range(len(class_names)))
    per_class = metrics.classification_report(
        truth, preds, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )
    return {
        "images": len(truth),
        "accuracy": metrics.accuracy_score(truth, preds),
        "balanced_accuracy": metrics.balanced_accuracy_score(truth, preds),
        "macro_f1": metrics.f1_score(truth, preds, labels=labels, average="macro", zero_division=0),
        "per_class": {name: per_class[name] for name in class_names},
        "confusion_matrix": metrics.confusion_matrix(truth, preds, labels=labels).tolist(),
        "class_names": class_names,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    summary = {k: report[k] for k in ("images", *SUMMARY_KEYS, "tta", "without_tta") if k in report}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    per_class = pd.DataFrame(report["per_class"]).T.rename_axis("class")
    atomic_write_text(out / "per_class.csv", per_class.to_csv(float_format="%.4f"))
    matrix = pd.DataFrame(report["confusion_matrix"], index=names, columns=names)
    atomic_write_text(out / "confusion_matrix.csv", matrix.rename_axis("true \\ predicted").to_csv())
    confusion_figure(np.array(report["confusion_matrix"]), names).savefig(out / "confusion_matrix.png", dpi=110)


# ---- predict -----------------------------------------------------------------------------
def image_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise FinetuneError(f"predict: {path} does not exist; give image files or folders of images")
    if not files:
        raise FinetuneError(f"predict: no image files in {' '.join(paths)}")
    return files


def predict(
    path: str | Path,
    inputs: list[str],
    top_k: int,
    batch_size: int = 64,
    tta: str | None = None,
    calibrated: bool = False,
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Top-k classes and probabilities per image file, in batches; for a multilabel model the
    labels at or above their thresholds, and every label's probability. `calibrated`: the
    probabilities of the temperature `finetune inspect` fitted for the checkpoint."""
    if top_k < 1:
        raise FinetuneError(f"predict --top-k {top_k}: must be at least 1")
    files = image_files(inputs)
    path = checkpoint_file(path)
    temperature = stored_temperature(path) if calibrated else 1.0
    exported = path.suffix == ".onnx" or path.name.endswith(".torchscript.pt")
    predictor = (
        exported_predictor(path, tta, threshold) if exported else load_predictor(path, tta=tta, threshold=threshold)
    )
    predictor.temperature = temperature
    if predictor.thresholds is not None and threshold is None:  # the labels named stay the uncalibrated decision
        predictor.thresholds = calibrated_thresholds(predictor.thresholds, temperature)
    k = min(top_k, len(predictor.class_names))
    results = []
    for start in range(0, len(files), batch_size):
        results += _predict_batch(files[start : start + batch_size], predictor, k)
    return results


def _predict_batch(files: list[Path], predictor: Predictor, k: int) -> list[dict[str, Any]]:
    """Each file is decoded as training decodes it; the readable ones are classified at once."""
    images = [decode_file(f, predictor.transform.size) for f in files]
    readable = [image for image in images if image is not None]
    probs = iter(predictor.probabilities([torch.stack(readable)]) if readable else [])
    results = []
    for file, image in zip(files, images, strict=True):
        if image is None:
            results.append({"file": str(file), "error": "unreadable image"})
            continue
        if predictor.thresholds is not None:
            results.append(_labelled(file, next(probs), predictor))
            continue
        values, index = next(probs).topk(k)
        pairs = zip(values.tolist(), index.tolist(), strict=True)
        top = [{"class": predictor.class_names[i], "probability": round(p, 6)} for p, i in pairs]
        results.append({"file": str(file), "top": top})
    return results


def _labelled(file: Path, probs: torch.Tensor, predictor: Predictor) -> dict[str, Any]:
    names = predictor.class_names
    every = {name: round(float(p), 6) for name, p in zip(names, probs, strict=True)}
    return {"file": str(file), "labels": labels_above(probs, names, predictor.thresholds), "probabilities": every}
