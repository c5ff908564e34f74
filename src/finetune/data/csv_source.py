"""`data.dataset: csv`: image files and their labels listed in a CSV file.

Paths are relative to `data.root`. Labels are read as text, so integer labels and names
alike become class names sorted as strings, as image folders sort theirs. Every row is
checked before any image is decoded: a missing file, an empty label or an unknown split is
one line naming the row (its line in the file, the header being line 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from finetune.config.schema import DataConfig
from finetune.data.splits import Pool, stratified_split
from finetune.errors import FinetuneError

SPLITS = {"train": False, "val": True}  # split_col value -> validates


@dataclass
class CsvSource:
    class_names: list[str]
    train: Pool  # items: file paths
    val: Pool


def read_csv_source(cfg: DataConfig) -> CsvSource:
    """The CSV's rows as a training and a validation pool of files, split by `data.split_col`
    or, without one, by a stratified `data.val_fraction` drawn by `data.split_seed`."""
    path = Path(cfg.csv)
    table = _read_table(path)
    _require_columns(table, cfg, path)
    labels = _column(table, cfg.label_col, "label", path)
    files = _files(_column(table, cfg.file_col, "file path", path), Path(cfg.root), cfg, path)
    class_names = sorted(set(labels))
    index = np.searchsorted(np.array(class_names), np.array(labels))
    if cfg.split_col is None:
        train, val = stratified_split(index, cfg.val_fraction, cfg.split_seed)
    else:
        is_val = _split_values(table[cfg.split_col], cfg.split_col, path)
        train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    pool = Pool(np.array(files, dtype=object), index)
    _require_training_rows(class_names, index[train], path)
    return CsvSource(class_names, pool.take(train), pool.take(val))


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise FinetuneError(
            f"data.csv = {path} not found; point data.csv at the CSV of image paths and labels"
        ) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FinetuneError(f"data.csv = {path} cannot be read as CSV ({reason}); fix the file") from None
    if table.empty:
        raise FinetuneError(f"data.csv = {path} holds no rows; list one image per row under a header")
    return table


def _require_columns(table: pd.DataFrame, cfg: DataConfig, path: Path) -> None:
    for key in ("file_col", "label_col", "split_col"):
        name = getattr(cfg, key)
        if name is not None and name not in table.columns:
            raise FinetuneError(
                f"data.{key} = {name!r}: {path} has no such column; its columns are {', '.join(table.columns)}"
            )


def _column(table: pd.DataFrame, name: str, what: str, path: Path) -> list[str]:
    """A column's cells, stripped; an empty one names its line."""
    cells = table[name].str.strip()
    empty = np.flatnonzero(cells.eq("").to_numpy())
    if len(empty):
        raise FinetuneError(
            f"{path} line {empty[0] + 2}: empty {what} in column {name!r} ({len(empty)} such rows); "
            "fill it in or remove the row"
        )
    return cells.tolist()


def _files(names: list[str], root: Path, cfg: DataConfig, path: Path) -> list[Path]:
    files = [root / name for name in names]
    missing = [i for i, file in enumerate(files) if not file.is_file()]
    if missing:
        first = missing[0]
        raise FinetuneError(
            f"{path} line {first + 2}: {names[first]} is not a file under data.root = {root} "
            f"({len(missing)} rows name missing files); fix data.root or the {cfg.file_col!r} column"
        )
    return files


def _split_values(column: pd.Series, name: str, path: Path) -> np.ndarray:
    """True for rows that validate; a value other than train/val names its line."""
    values = column.str.strip().str.lower()
    bad = np.flatnonzero(~values.isin(list(SPLITS)).to_numpy())
    if len(bad):
        raise FinetuneError(
            f"{path} line {bad[0] + 2}: {column.iloc[bad[0]]!r} in column {name!r} is not a split; use train or val"
        )
    return values.map(SPLITS).to_numpy(dtype=bool)


def _require_training_rows(class_names: list[str], train_labels: np.ndarray, path: Path) -> None:
    """A class seen only in validation rows could never be predicted."""
    lacking = sorted(set(range(len(class_names))) - set(train_labels.tolist()))
    if lacking:
        names = ", ".join(class_names[i] for i in lacking)
        raise FinetuneError(f"{path}: class(es) {names} have no training rows; add some or drop their rows")
