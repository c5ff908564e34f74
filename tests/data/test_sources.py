"""A CSV of image files as a dataset, and k-fold validation carved out of the training pool."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, folder_as_csv, make_imagefolder

from finetune.config.load import load_config
from finetune.config.schema import DataConfig
from finetune.data.imageset import scan_folder
from finetune.data.sources import load_data, split_sizes
from finetune.data.splits import fold_split, stratified_split
from finetune.errors import FinetuneError


def csv_config(root: Path, csv: Path, **values) -> DataConfig:
    keys = {"file_col": "path", "label_col": "y", "split_col": "part", "image_size": 32}
    return DataConfig(dataset="csv", root=str(root), csv=str(csv), **{**keys, **values})


def assert_same_splits(a, b) -> None:
    assert a.class_names == b.class_names
    for x, y in ((a.train, b.train), (a.val, b.val)):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.images, y.images)


def test_a_csv_of_an_image_folder_loads_the_same_images_labels_and_classes(imagefolder, tmp_path):
    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    folder = load_data(DataConfig(dataset="imagefolder", root=str(imagefolder), image_size=32))
    assert_same_splits(load_data(csv_config(imagefolder, csv)), folder)
    cfg = csv_config(imagefolder, csv, memory_budget_mb=0, num_workers=1)
    streamed = load_data(cfg)
    folder_cfg = DataConfig(dataset="imagefolder", root=str(imagefolder), image_size=32, memory_budget_mb=0)
    assert streamed.train.images is None and streamed.train.files == load_data(folder_cfg).train.files
    assert torch.equal(streamed.train.labels, folder.train.labels)
    assert split_sizes(cfg) == (list(CLASSES), 24, 12)


def test_integer_labels_become_class_names_sorted_as_folders_sort(tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=("1", "2", "10"), train_per_class=2, val_per_class=1)
    csv = folder_as_csv(root, tmp_path / "labels.csv")
    assert pd.read_csv(csv)["y"].dtype.kind == "i"  # the CSV holds integers, not text
    data = load_data(csv_config(root, csv))
    assert data.class_names == ["1", "10", "2"] == scan_folder(root / "train")[0]
    only_ten = load_data(csv_config(root, csv, train_classes=[10]))
    assert set(only_ten.train.labels.tolist()) == {1}, "an integer means the class of that name, as for folders"


def test_without_a_split_column_val_fraction_splits_each_class_by_split_seed(imagefolder, tmp_path):
    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    cfg = csv_config(imagefolder, csv, split_col=None, val_fraction=0.25)
    data = load_data(cfg)
    assert np.bincount(data.val.labels.numpy()).tolist() == [3, 3, 3]  # a quarter of each class's 12 rows
    assert np.bincount(data.train.labels.numpy()).tolist() == [9, 9, 9]
    again, other = load_data(cfg), load_data(DataConfig(**{**vars(cfg), "split_seed": 7}))
    assert torch.equal(again.val.images, data.val.images)
    assert not torch.equal(other.val.images, data.val.images)


def test_stratified_split_keeps_a_lone_image_for_training():
    labels = np.array([0] * 10 + [1] * 2 + [2])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert sorted([*train, *val]) == list(range(13))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing_file", r"labels\.csv line 5: train/cat/0003\.png is not a file under data\.root = .* \(1 rows"),
        ("empty_label", r"labels\.csv line 3: empty label in column 'y' \(1 such rows\)"),
        ("bad_split", r"labels\.csv line 4: 'test' in column 'part' is not a split; use train or val"),
        ("label_col", r"data\.label_col = 'label': .*labels\.csv has no such column; its columns are path, y, part"),
        ("val_only_class", r"labels\.csv: class\(es\) owl have no training rows"),
    ],
)
def test_bad_csv_rows_and_columns_are_one_line_naming_them(imagefolder, tmp_path, change, message):
    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    values = {}
    if change == "missing_file":
        (imagefolder / table.loc[3, "path"]).unlink()
    elif change == "empty_label":
        table.loc[1, "y"] = " "
    elif change == "bad_split":
        table.loc[2, "part"] = "test"
    elif change == "label_col":
        values["label_col"] = "label"
    else:
        table.loc[table["part"] == "val", "y"] = table.loc[table["part"] == "val", "y"].replace("frog", "owl")
    table.to_csv(csv, index=False)
    for read in (load_data, split_sizes):
        with pytest.raises(FinetuneError, match=message):
            read(csv_config(imagefolder, csv, **values))


def test_a_csv_dataset_without_a_csv_file_is_refused_by_the_config_check(tmp_path):
    with pytest.raises(FinetuneError, match="data.dataset = csv needs data.csv"):
        load_config(None, ["data.dataset=csv"])
    with pytest.raises(FinetuneError, match=r"data\.csv = .*nope\.csv not found"):
        split_sizes(DataConfig(dataset="csv", csv=str(tmp_path / "nope.csv")))


# ---- k-fold ------------------------------------------------------------------------------
def test_folds_partition_the_training_pool_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    vals = [fold_split(labels, 5, fold, seed=1)[1] for fold in range(5)]
    assert sorted(np.concatenate(vals).tolist()) == list(range(60))
    for fold, val in enumerate(vals):
        train = fold_split(labels, 5, fold, seed=1)[0]
        assert not set(train) & set(val) and len(train) + len(val) == 60
        assert np.bincount(labels[val]).tolist() == [2, 4, 6]
    assert not np.array_equal(vals[0], fold_split(labels, 5, 0, seed=2)[1])


@pytest.mark.parametrize("dataset", ["imagefolder", "csv", "digits"])
def test_every_dataset_validates_on_a_fold_of_its_training_images(imagefolder, tmp_path, dataset):
    csv = folder_as_csv(imagefolder, tmp_path / "labels.csv")
    base = csv_config(imagefolder, csv) if dataset == "csv" else DataConfig(dataset=dataset, root=str(imagefolder))
    plain = load_data(plain_cfg(base))
    pool = sorted(image_key(image) for image in plain.train.images)
    seen = []
    for fold in range(4):
        cfg = DataConfig(**{**vars(plain_cfg(base)), "folds": 4, "fold": fold})
        data = load_data(cfg)
        assert split_sizes(cfg) == (data.class_names, len(data.train), len(data.val))
        val = [image_key(image) for image in data.val.images]
        assert sorted([*(image_key(image) for image in data.train.images), *val]) == pool
        seen += val
    assert sorted(seen) == pool, "each training image validates in exactly one fold"


def plain_cfg(cfg: DataConfig) -> DataConfig:
    return DataConfig(**{**vars(cfg), "train_size": None, "val_size": None})


def image_key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.folds=5", "data.fold=5"], r"data\.fold = 5 must be between 0 and data\.folds - 1 = 4"),
        (["data.folds=1"], r"data\.folds = 1 must be >= 2"),
        (["data.fold=2"], r"data\.fold = 2 needs data\.folds"),
    ],
)
def test_a_fold_that_does_not_exist_is_refused_before_any_data_is_read(sets, message):
    with pytest.raises(FinetuneError, match=message):
        load_config(None, sets)


def test_more_folds_than_images_of_any_class_is_one_line(imagefolder):
    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder), folds=9)
    with pytest.raises(FinetuneError, match=r"data\.folds = 9 is more than the 8 training images of the largest class"):
        split_sizes(cfg)


def test_folds_need_only_a_train_folder(imagefolder):
    import shutil

    shutil.rmtree(imagefolder / "val")
    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder), folds=4, fold=1)
    data = load_data(cfg)
    assert (len(data.train), len(data.val)) == (18, 6) and split_sizes(cfg)[1:] == (18, 6)
    with pytest.raises(FinetuneError, match=r"must hold train/ and val/ \(or test/\) folders"):
        load_data(DataConfig(dataset="imagefolder", root=str(imagefolder)))
