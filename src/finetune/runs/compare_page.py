"""compare's report.html (`compare --html`): the table, seeds as mean and spread, the curves
(train and val per run, repeated settings as a mean inside a band), the trade-off plot and
the lines that say which differences are within the validation noise, on one page that opens
from disk. It embeds the PNGs compare has just written beside it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from finetune.runs.compare_text import readable
from finetune.runs.html_page import Page

PICTURES = (
    (
        "curves.png",
        "Curves",
        "accuracy and loss per epoch: val solid, train dashed; a setting repeated over "
        "seeds or folds is their mean inside a min-max band; dotted: a stage starts",
    ),
    ("tradeoff.png", "Accuracy against training time", "the best trade-offs circled: no other run beats them on both"),
    ("per_class.png", "Per class", "final validation accuracy per class"),
)


def write_compare_page(out: Path, table: pd.DataFrame, seeds: pd.DataFrame | None, notes: list[str]) -> Path:
    page = Page(f"finetune compare: {len(table)} runs")
    for line in notes:
        page.text(line)
    page.heading("Runs")
    page.table(readable(table))
    if seeds is not None:
        page.heading("Settings repeated over seeds or folds: mean and std")
        page.table(readable(seeds))
    for name, heading, caption in PICTURES:
        if (out / name).is_file():
            page.heading(heading)
            page.image_file(out / name, caption)
    return page.write(out / "report.html")
