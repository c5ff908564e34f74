"""inspect's report.html: one page with what the inspection found and the run around it (its
curves, train and val, from results.csv; the runtime from summary.json; its config), every
picture embedded, so it opens from disk anywhere. It holds no time of day: the same run and
data write the same page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from finetune.inference.calibration import CalibrationReport
from finetune.inference.gradcam import CamLayer
from finetune.inference.predict import Predictor
from finetune.runs.compare_plots import plot_curves
from finetune.runs.discover import RUN_FILES, load_run
from finetune.runs.html_page import Page

RUNTIME_KEYS = ("device", "precision", "memory_format", "processes", "train_size", "val_size", "total_seconds")
RUNTIME_CHOICES = ("infer_precision", "compile", "decided_by", "lr_scale")  # summary.json's runtime section
CONFUSED_ROWS = 10


def write_report_page(
    out: Path,
    ckpt_path: Path,
    ckpt: dict[str, Any],
    report: dict[str, Any],
    calibration: CalibrationReport,
    scored_on: str,
) -> Path:
    page = Page(f"finetune inspect: {ckpt_path}")
    page.text(
        f"{ckpt['arch']} at {ckpt['image_size']} px, {report['images']} images scored ({scored_on}): accuracy "
        f"{report['accuracy']:.4f}, balanced accuracy {report['balanced_accuracy']:.4f}, "
        f"macro F1 {report['macro_f1']:.4f}."
    )
    calibration_section(page, calibration, out)
    page.heading("Most wrong")
    page.image_file(out / "top_losses.png", "the images with the highest loss, each beside its Grad-CAM")
    page.image_file(out / "top_correct.png", "right and most sure: where the model looked when it was right")
    _confused(page, out)
    page.heading("Per class")
    page.table(pd.read_csv(out / "per_class.csv"))
    page.image_file(out / "confusion_matrix.png", "confusion matrix (rows: true class)")
    run_section(page, ckpt_path.parent)
    page.heading("Config")
    page.code(yaml.safe_dump(ckpt["config"], sort_keys=False))
    return page.write(out / "report.html")


def calibration_section(page: Page, c: CalibrationReport, out: Path) -> None:
    page.heading("Calibration")
    rows = [
        ("temperature (fitted on all images; predict --calibrated uses it)", c.temperature),
        ("ECE before (temperature 1)", c.ece_before),
        ("ECE after, on the images the temperature was fitted on", c.ece_after_fit),
        ("ECE after, held out (each half scaled by the temperature fitted on the other)", c.ece_after_heldout),
        ("NLL before", c.nll_before),
        ("NLL after, on the fit images", c.nll_after_fit),
    ]
    page.table(pd.DataFrame(rows, columns=["", "value"]))
    if not c.fitted:
        page.text(f"{c.fit.capitalize()}.", note=True)
    page.image_file(out / "reliability.png", "reliability diagram before and after temperature scaling")


def _confused(page: Page, out: Path) -> None:
    page.heading("Most confused")
    confused = pd.read_csv(out / "most_confused.csv")
    if confused.empty:
        page.text("No image was taken for another class.")
        return
    page.table(confused.head(CONFUSED_ROWS))
    page.image_file(out / "most_confused.png", "worst pairs: images taken for the other class, then right ones of it")


def run_section(page: Page, run_dir: Path) -> None:
    """Curves and runtime, where the checkpoint sits in the run dir that train wrote."""
    page.heading("Training curves")
    if not all((run_dir / name).is_file() for name in RUN_FILES):
        page.text(f"{run_dir} is not a run dir (no config.yaml and results.csv): no curves or runtime.", note=True)
        return
    run = load_run(run_dir, run_dir.name)
    if run is None:
        page.text("results.csv holds no epoch yet.", note=True)
        return
    page.figure(plot_curves({run.name: [run]}), "accuracy and loss per epoch: val solid, train dashed")
    page.heading("Runtime it trained on")
    page.table(_runtime(run.summary))


def _runtime(summary: dict[str, Any]) -> pd.DataFrame:
    facts = {key: summary.get(key) for key in RUNTIME_KEYS}
    facts.update({f"runtime.{key}": summary.get("runtime", {}).get(key) for key in RUNTIME_CHOICES})
    facts["time_per_epoch_by_stage"] = json.dumps(summary.get("time_per_epoch_by_stage"))
    return pd.DataFrame([(k, _cell(v)) for k, v in facts.items()], columns=["summary.json", ""])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def scored_on(predictor: Predictor, layer: CamLayer) -> str:
    return f"{predictor.runtime.device.type} {predictor.runtime.precision}, Grad-CAM at layer {layer.name}"
