"""`data.dataset: csv`: image files and their labels listed in a CSV file.

Paths are relative to `data.root`. Labels are read as text, so integer labels and names
alike become class names sorted as strings, as image folders sort theirs (or, with
`data.classes`, in its order). With `task: multilabel` a cell holds an image's labels joined
by `data.label_sep`, an empty cell meaning no label, and they become multi-hot rows. Every row is
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


def read_csv_source(cfg: DataConfig, multilabel: bool = False) -> CsvSource:
    """The CSV's rows as a training and a validation pool of files, split by `data.split_col`
    or, without one, by a stratified `data.val_fraction` drawn by `data.split_seed`. Labels are
    class indices, or with `multilabel` multi-hot rows (N, classes) of float32."""
    path = Path(cfg.csv)
    table = _read_table(path)
    _require_columns(table, cfg, path)
    if multilabel:
        rows = [_split_labels(cell, cfg.label_sep) for cell in table[cfg.label_col].str.strip()]
    else:
        rows = [[label] for label in _column(table, cfg.label_col, "label", path)]
    files = _files(_column(table, cfg.file_col, "file path", path), Path(cfg.root), cfg, path)
    class_names = list(cfg.classes) if cfg.classes is not None else sorted({x for row in rows for x in row})
    if not class_names:
        raise FinetuneError(f"{path}: column {cfg.label_col!r} holds no label in any row; name the labels' column")
    _require_known(rows, class_names, path)
    targets = _targets(rows, class_names, multilabel)
    if cfg.split_col is None:
        train, val = stratified_split(targets, cfg.val_fraction, cfg.split_seed)
    else:
        is_val = _split_values(table[cfg.split_col], cfg.split_col, path)
        train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    pool = Pool(np.array(files, dtype=object), targets)
    if not multilabel:
        _require_training_rows(class_names, targets[train], path)
    return CsvSource(class_names, pool.take(train), pool.take(val))


def _split_labels(cell: str, sep: str) -> list[str]:
    """An image's labels: the cell split at `sep`, blanks dropped (an empty cell: no label)."""
    return list(dict.fromkeys(x.strip() for x in cell.split(sep) if x.strip()))


def _require_known(rows: list[list[str]], class_names: list[str], path: Path) -> None:
    """With `data.classes` every label a row names is one of them."""
    known = set(class_names)
    for i, row in enumerate(rows):
        unknown = [x for x in row if x not in known]
        if unknown:
            raise FinetuneError(
                f"{path} line {i + 2}: label {unknown[0]!r} is not in data.classes ({', '.join(class_names)}); "
                "add it there or fix the row"
            )


def _targets(rows: list[list[str]], class_names: list[str], multilabel: bool) -> np.ndarray:
    position = {name: i for i, name in enumerate(class_names)}
    if not multilabel:
        return np.array([position[row[0]] for row in rows], dtype=np.int64)
    hot = np.zeros((len(rows), len(class_names)), dtype=np.float32)
    for i, row in enumerate(rows):
        hot[i, [position[x] for x in row]] = 1.0
    return hot


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


def require_trained_labels(class_names: list[str], train: np.ndarray, val: np.ndarray, path: Path) -> None:
    """A label that validation images carry and no training image does could never be learnt:
    asked of the images that finally train and validate (after folds and subsets)."""
    unseen = np.flatnonzero((val.sum(0) > 0) & (train.sum(0) == 0))
    if len(unseen):
        names = ", ".join(class_names[i] for i in unseen)
        raise FinetuneError(
            f"{path}: label(s) {names} appear in validation rows but in no training row; "
            "add training rows that carry them, drop them from the validation rows, or draw the split, "
            "fold or subset another way (data.split_seed)"
        )


def _require_training_rows(class_names: list[str], train_labels: np.ndarray, path: Path) -> None:
    """A class seen only in validation rows could never be predicted."""
    lacking = sorted(set(range(len(class_names))) - set(train_labels.tolist()))
    if lacking:
        names = ", ".join(class_names[i] for i in lacking)
        raise FinetuneError(f"{path}: class(es) {names} have no training rows; add some or drop their rows")
