"""Edge cases found by a close read of main: each test failed before its fix."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from conftest import make_imagefolder, write_config
from PIL import Image

from finetune.cli import main
from finetune.config.schema import DataConfig
from finetune.data.batching import split_batches
from finetune.data.imageset import ImageSet
from finetune.data.sources import load_data
from finetune.runs.compare import Run, comparison_table
from finetune.training.losses import class_weights


def test_a_last_batch_of_one_joins_the_batch_before():
    assert [len(b) for b in split_batches(torch.arange(33), 32)] == [33]
    assert [len(b) for b in split_batches(torch.arange(65), 32)] == [32, 33]
    assert [len(b) for b in split_batches(torch.arange(34), 32)] == [32, 2]
    assert [len(b) for b in split_batches(torch.arange(1), 32)] == [1]


def test_training_on_33_images_in_batches_of_32_runs_cached_and_uncached(tmp_path):
    """BatchNorm in train mode cannot take a batch of one: 33 images, batch 32 used to crash."""
    data = make_imagefolder(tmp_path / "data", train_per_class=11)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 32})
    for cache in ("auto", "off"):
        run = tmp_path / cache
        assert (
            main(
                ["train", str(config), "--run-dir", str(run), "--set", "train.epochs=2", f"train.feature_cache={cache}"]
            )
            == 0
        )
        assert len(pd.read_csv(run / "results.csv")) == 2


def test_integers_mean_folder_names_when_class_folders_are_numbers(tmp_path):
    root = make_imagefolder(tmp_path / "numeric", classes=("1", "2", "10"))
    data = load_data(DataConfig(dataset="imagefolder", root=str(root), train_classes=[2], image_size=32))
    assert data.class_names == ["1", "10", "2"], "folders sort as strings, as in torchvision"
    assert set(data.train.labels.tolist()) == {2}, "2 is the folder named 2, not index 2 (folder 10)"
    weights = class_weights({10: 3.0}, np.array([4, 4, 4]), data.class_names)
    assert weights.tolist() == [1.0, 3.0, 1.0]


def test_compare_picks_each_runs_best_by_its_own_monitor():
    results = pd.DataFrame(
        {"epoch": [1, 2], "stage": ["head", "head"], "val_acc": [0.5, 0.6], "val_loss": [0.9, 1.2]}
        | {"val_balanced_acc": [0.5, 0.6], "epoch_seconds": [1.0, 1.0]}
    )
    runs = [
        Run(monitor, {"train.epochs": 2, "checkpoint.monitor": monitor}, results, {})
        for monitor in ("val_loss", "val_acc")
    ]
    table = comparison_table(runs, sort="run").set_index("run")
    assert table.loc["val_loss", "best_epoch"] == 1 and table.loc["val_loss", "best_val_acc"] == 0.5
    assert table.loc["val_acc", "best_epoch"] == 2 and table.loc["val_acc", "best_val_acc"] == 0.6
    assert table["monitor"].tolist() == ["val_acc", "val_loss"]


def test_streamed_fingerprint_sees_a_file_replaced_with_same_size_and_time(tmp_path):
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.bmp"  # uncompressed: new pixels, same byte size
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(path)
        files.append(path)
    images = ImageSet(torch.tensor([0, 1, 2]), files=files, size=8, workers=1)
    before = images.fingerprint()
    stat = files[1].stat()
    Image.fromarray(np.full((8, 8, 3), 99, dtype=np.uint8)).save(files[1])
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files[1].stat().st_size == stat.st_size and files[1].stat().st_mtime_ns == stat.st_mtime_ns
    assert images.fingerprint() != before


def test_feature_cache_key_follows_weights_pixels_size_normalization_and_precision(make_trainer):
    base = make_trainer()
    key = base.features.key()
    assert make_trainer(run_name="same").features.key() == key
    assert make_trainer("data.image_size=48", run_name="size").features.key() != key
    assert make_trainer("precision=bf16", run_name="bf16").features.key() != key
    assert make_trainer("data.train_size=20", run_name="pixels").features.key() != key
    base.built.mean = (0.5, 0.5, 0.5)
    assert base.features.key() != key
    base.built.mean = make_trainer(run_name="mean").built.mean
    with torch.no_grad():
        base.model.layer1[0].conv1.weight[0, 0, 0, 0] += 1
    assert base.features.key() != key


def test_large_photos_are_held_at_image_size_within_the_memory_budget(tmp_path):
    """24 photos of 2000x1500 and 1800x1200 (about 200 MB decoded at full size) against a 1 MB
    budget: at 64 px they take 0.3 MB, so they are held in memory, never at full size."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog", "frog"):
            for i in range(4):
                width, height = (2000, 1500) if i % 2 else (1800, 1200)
                pixels = rng.integers(0, 255, (height // 50, width // 50, 3), dtype=np.uint8)
                path = tmp_path / "photos" / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).resize((width, height)).save(path, quality=80)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "photos"), image_size=64, memory_budget_mb=1)
    data = load_data(cfg)
    assert data.train.images is not None, "fits the budget once decoded at image_size"
    assert tuple(data.train.images.shape) == (12, 3, 64, 64)
    assert data.train.images.nbytes + data.val.images.nbytes <= cfg.memory_budget_mb * 2**20
