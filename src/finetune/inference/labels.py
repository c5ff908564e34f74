"""Multi-label inference: the thresholds a prediction uses, eval's per-label report, and the
labels `predict` names for one image.

A multilabel checkpoint (and an export's contract) carries one threshold per label, chosen on
the validation images at its best epoch (training/multilabel.py); `--threshold T` puts T in
place of every one of them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.training.multilabel import COUNTS, DEFAULT_THRESHOLD, exact_match, score_labels

SUMMARY_KEYS = ("map", "f1_micro", "f1_macro", "exact_match")


def thresholds_of(saved: dict[str, Any], override: float | None, where: str) -> list[float] | None:
    """The thresholds a prediction uses: `override` for every label, else the saved ones; None
    for a multiclass model, where `--threshold` means nothing."""
    if saved.get("task", "multiclass") != "multilabel":
        if override is not None:
            raise FinetuneError(f"--threshold {override:g}: {where} is a multiclass model; drop --threshold")
        return None
    if override is None:
        return saved_thresholds(saved, where)
    if not 0.0 < override < 1.0:
        raise FinetuneError(f"--threshold {override:g}: give a probability between 0 and 1, e.g. 0.5")
    return [float(override)] * len(saved["class_names"])


def saved_thresholds(saved: dict[str, Any], where: str) -> list[float]:
    """The checkpoint's per-label thresholds; a last.pt written before its first evaluation chose
    any (a run stopped in epoch 1) has none, and takes DEFAULT_THRESHOLD for every label."""
    if saved.get("thresholds") is None:
        warnings.warn(
            f"{where} was saved before an evaluation chose its thresholds; every label uses "
            f"{DEFAULT_THRESHOLD} (give --threshold T, or use best.pt)",
            stacklevel=2,
        )
        return [DEFAULT_THRESHOLD] * len(saved["class_names"])
    return [float(t) for t in saved["thresholds"]]


def label_report(
    probs: torch.Tensor, truth: torch.Tensor, class_names: list[str], thresholds: list[float]
) -> dict[str, Any]:
    """eval's report of a multilabel model: mAP, micro / macro F1 and exact match at the
    thresholds, and per label AP, precision, recall, F1, support, threshold and TP/FP/FN/TN."""
    p, t = probs.numpy(), truth.numpy()
    scores = score_labels(p, t, np.array(thresholds, np.float32))
    return {
        "task": "multilabel",
        "images": len(t),
        "map": scores.mean_ap,
        "f1_micro": scores.f1_micro,
        "f1_macro": scores.f1_macro,
        "exact_match": exact_match(p, t, np.array(thresholds, np.float32)),
        "per_class": scores.per_label(class_names),
        "class_names": class_names,
    }


def write_label_report(report: dict[str, Any], out: Path) -> None:
    """metrics.json, per_class.csv (scores per label) and label_confusion.csv (its TP/FP/FN/TN)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: report[k] for k in ("task", "images", *SUMMARY_KEYS, "tta", "without_tta") if k in report}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    table = pd.DataFrame(report["per_class"]).T.rename_axis("label")
    scores = table.drop(columns=list(COUNTS))
    atomic_write_text(out / "per_class.csv", scores.to_csv(float_format="%.4f"))
    atomic_write_text(out / "label_confusion.csv", table[list(COUNTS)].astype(int).to_csv())


def labels_above(probs: torch.Tensor, class_names: list[str], thresholds: list[float]) -> list[dict[str, Any]]:
    """The labels whose probability reaches their threshold, most probable first."""
    chosen = (probs >= torch.tensor(thresholds, dtype=probs.dtype)).nonzero().flatten().tolist()
    chosen.sort(key=lambda j: -float(probs[j]))
    return [{"class": class_names[j], "probability": round(float(probs[j]), 6)} for j in chosen]
