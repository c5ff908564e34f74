"""A multilabel inspection's report.html: inspect_report.py's page with the per-label pieces
(mAP, the labels most missed, precision-recall curves) where a single-label model has its
confusions, and mAP per epoch beside the run's curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from finetune.inference.calibration import CalibrationReport
from finetune.inference.inspect_multilabel_plots import map_figure
from finetune.inference.inspect_report import calibration_section, run_section
from finetune.runs.html_page import Page

MISSED_ROWS = 20


def write_label_page(
    out: Path,
    ckpt_path: Path,
    ckpt: dict[str, Any],
    report: dict[str, Any],
    calibration: CalibrationReport,
    scored_on: str,
) -> Path:
    page = Page(f"finetune inspect: {ckpt_path}")
    page.text(
        f"{ckpt['arch']} at {ckpt['image_size']} px, multilabel, {report['images']} images scored ({scored_on}): "
        f"mAP {report['map']:.4f}, F1 micro {report['f1_micro']:.4f}, F1 macro {report['f1_macro']:.4f}, "
        f"exact match {report['exact_match']:.4f} at the stored per-label thresholds."
    )
    calibration_section(page, calibration, out)
    page.text("Every (image, label) pair is one prediction: its sigmoid probability, pooled over labels.", note=True)
    page.heading("Most wrong")
    page.image_file(out / "top_losses.png", "highest loss, each beside the Grad-CAM of the label it got most wrong")
    page.image_file(out / "top_correct.png", "every label right: the Grad-CAM of the surest true label")
    page.heading("Most missed labels")
    page.table(pd.read_csv(out / "most_missed.csv").head(MISSED_ROWS))
    page.image_file(out / "most_missed.png", "missed and false images per label, beside its support")
    page.image_file(out / "pr_curves.png", "precision-recall per label, AP in each title")
    page.heading("Per label")
    page.table(pd.read_csv(out / "per_class.csv"))
    results = ckpt_path.parent / "results.csv"
    if results.is_file():
        page.heading("mAP per epoch")
        page.figure(map_figure(pd.read_csv(results)), "validation mAP and F1 per epoch, from results.csv")
    run_section(page, ckpt_path.parent)
    page.heading("Config")
    page.code(yaml.safe_dump(ckpt["config"], sort_keys=False))
    return page.write(out / "report.html")
