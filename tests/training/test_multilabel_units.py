"""`task: multilabel` units that train nothing: CSV labels as multi-hot rows, stratified splits
and folds, mixed targets, the losses, thresholds, and the bad-input lines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_imagefolder, write_config
from test_multilabel import NAMES, csv_data, labelled, ml_config, one_error_line

from finetune.cli import main
from finetune.config.load import load_config
from finetune.config.schema import AugmentConfig, TrainConfig
from finetune.data.augment import Augment
from finetune.data.csv_source import read_csv_source
from finetune.data.sources import load_data
from finetune.data.splits import fold_split, stratified_split
from finetune.errors import FinetuneError
from finetune.inference.labels import thresholds_of
from finetune.training.losses import POS_WEIGHT_BOUNDS, MultiLabelLoss, WeightedCrossEntropy, build_criterion
from finetune.training.multilabel import DEFAULT_THRESHOLD, choose_thresholds
from finetune.training.session import training_data


# ---- data ---------------------------------------------------------------------------------
def test_labels_become_multi_hot_rows_an_empty_cell_no_label(tmp_path):
    data, csv = labelled(tmp_path)
    source = read_csv_source(csv_data(csv, data, split_col="part"), multilabel=True)
    assert source.class_names == NAMES
    frog = np.array(["frog" in str(f) for f in source.train.items])
    assert source.train.labels.dtype == np.float32 and source.train.labels.shape == (24, 3)
    assert (source.train.labels[frog] == 0).all()
    assert source.train.labels[~frog].sum(1).tolist() == [2.0] * 16
    fixed = read_csv_source(csv_data(csv, data, split_col="part", classes=["pet", "dog", "cat"]), multilabel=True)
    assert fixed.class_names == ["pet", "dog", "cat"] and (fixed.train.labels[~frog, 0] == 1).all()


def test_streamed_and_in_memory_sets_hold_the_same_float_targets(tmp_path):
    data, csv = labelled(tmp_path)
    memory = load_data(csv_data(csv, data, split_col="part", image_size=32), multilabel=True)
    streamed = load_data(csv_data(csv, data, split_col="part", image_size=32, memory_budget_mb=0), multilabel=True)
    assert memory.train.images is not None and streamed.train.images is None
    assert memory.train.labels.dtype == torch.float32
    assert torch.equal(memory.train.labels, streamed.train.labels)


def test_split_and_folds_stratify_every_label(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 4)) < [0.5, 0.3, 0.1, 0.05]).astype(np.float32)
    train, val = stratified_split(labels, 0.25, seed=1)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    off = labels[val].sum(0) - 0.25 * labels.sum(0)
    assert np.all(np.abs(off) <= 1.5), off  # each label's share within an image or so
    folds = [fold_split(labels, 4, k, seed=1)[1] for k in range(4)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(200))
    for fold in folds:
        assert np.all(labels[fold].sum(0) > 0), "every fold sees every label"


def test_mixup_mixes_multi_hot_targets():
    augment = Augment(AugmentConfig(mixup=0.4), 8, num_classes=3, seed=0)
    targets = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    x, mixed = augment.mix(torch.rand(4, 3, 8, 8), targets, epoch=1, step=0)
    lam = float(mixed[0, 2])  # image 0 carries label 2, image 3 (rolled onto it) does not
    assert torch.allclose(mixed, lam * targets + (1 - lam) * targets.roll(1, 0))


# ---- losses and thresholds ----------------------------------------------------------------
def test_focal_with_gamma_0_is_the_plain_loss_and_down_weighs_easy_terms():
    logits, index = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = WeightedCrossEntropy(None)(logits, index)
    assert torch.allclose(WeightedCrossEntropy(None, gamma=0.0)(logits, index), plain)
    assert WeightedCrossEntropy(None, gamma=2.0)(logits, index) < plain
    targets = (torch.rand(6, 3) < 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(MultiLabelLoss(None)(logits, targets), bce)
    assert MultiLabelLoss(None, gamma=2.0)(logits, targets) < bce
    smoothed = MultiLabelLoss(None, label_smoothing=0.2)(logits, targets)
    assert torch.allclose(smoothed, F.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1))


def test_auto_positive_weights_are_negatives_over_positives_clipped():
    counts = np.array([50, 1, 0, 90])
    with pytest.warns(UserWarning, match="no training image carries c"):
        loss, weights = build_criterion(TrainConfig(loss="focal"), "auto", counts, 100, ["a", "b", "c", "d"], True)
    assert isinstance(loss, MultiLabelLoss) and loss.gamma == 2.0
    assert weights.tolist() == [1.0, min(99.0, POS_WEIGHT_BOUNDS[1]), 1.0, 1.0]


def test_thresholds_maximize_f1_between_scores_and_rare_labels_keep_the_default():
    probs = np.array([[0.9, 0.9], [0.8, 0.1], [0.7, 0.2], [0.6, 0.3], [0.5, 0.4], [0.3, 0.5], [0.2, 0.6]], np.float32)
    truth = np.array([[1, 1], [1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [0, 0]], np.float32)
    thresholds = choose_thresholds(probs, truth)
    assert thresholds[0] == pytest.approx(0.4)  # all five positives, halfway to the next score
    assert thresholds[1] == DEFAULT_THRESHOLD  # one positive: too rare to tune


# ---- bad input: one line, exit 2 ----------------------------------------------------------
def test_a_row_naming_a_label_outside_data_classes_is_one_line(tmp_path, capsys):
    data, csv = labelled(tmp_path)
    config = ml_config(tmp_path, csv, data, data={"classes": ["cat", "pet"]})
    assert main(["train", str(config)]) == 2
    err = one_error_line(capsys)
    assert "line " in err and "'dog' is not in data.classes" in err


def test_a_validation_label_never_seen_in_training_is_one_line(tmp_path, capsys):
    data, csv = labelled(tmp_path)
    table = pd.read_csv(csv, keep_default_na=False)
    table.loc[table["part"].eq("val").idxmax(), "y"] = "cat bird"
    table.to_csv(csv, index=False)
    assert main(["train", str(ml_config(tmp_path, csv, data))]) == 2
    assert "label(s) bird appear in validation rows but in no training row" in one_error_line(capsys)


def test_a_label_that_only_a_fold_s_validation_images_carry_is_refused(tmp_path):
    """Checked on the images that finally train and validate: one row carries `bird`, so the
    fold that validates on it leaves training without one."""
    data, csv = labelled(tmp_path)
    table = pd.read_csv(csv, keep_default_na=False)
    table.loc[table["part"].eq("train").idxmax(), "y"] = "cat bird"
    table.drop(columns="part").to_csv(csv, index=False)
    refused = []
    for fold in range(4):
        cfg = load_config(str(ml_config(tmp_path, csv, data, data={"split_col": None, "folds": 4, "fold": fold})))
        try:
            training_data(cfg)
        except FinetuneError as exc:
            refused.append(str(exc))
    assert len(refused) == 1 and "label(s) bird appear in validation rows but in no training row" in refused[0]


def test_a_label_column_with_no_label_in_any_row_is_one_line(tmp_path, capsys):
    data, csv = labelled(tmp_path)
    table = pd.read_csv(csv, keep_default_na=False)
    table.assign(y="").to_csv(csv, index=False)
    assert main(["train", str(ml_config(tmp_path, csv, data))]) == 2
    assert "column 'y' holds no label in any row" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["checkpoint.monitor=val_map"], "checkpoint.monitor = val_map exists only with task: multilabel"),
        (
            ["task=multilabel", "data.dataset=csv", "data.csv=labels.csv", "data.classes=[traffic light, car]"],
            "data.classes name 'traffic light', which holds data.label_sep ' '",
        ),
        (["task=multilabel"], "task = multilabel needs data.dataset = csv"),
        (
            ["task=multilabel", "data.dataset=csv", "data.csv=labels.csv", "data.sampler=balanced"],
            "data.sampler = balanced needs one class per image",
        ),
    ],
)
def test_a_task_mismatch_is_one_line_at_load(tmp_path, capsys, sets, message):
    config = write_config(tmp_path / "c.yaml", make_imagefolder(tmp_path / "data"), tmp_path / "runs")
    assert main(["plan", str(config), "--set", *sets]) == 2
    assert message in one_error_line(capsys)


def test_focal_loss_with_gamma_below_1_keeps_gradients_finite_at_a_certain_prediction():
    """(1 - p_t)^gamma has an infinite slope at p_t = 1 for gamma < 1: floored, the gradient of
    a confident, right prediction is a number (it was NaN, and the run died after the epoch)."""
    logits = torch.tensor([[40.0, -40.0, 0.3]], requires_grad=True)
    for loss in (MultiLabelLoss(None, gamma=0.5), WeightedCrossEntropy(None, gamma=0.5)):
        targets = torch.tensor([[1.0, 0.0, 1.0]]) if isinstance(loss, MultiLabelLoss) else torch.tensor([0])
        (grad,) = torch.autograd.grad(loss(logits, targets), logits)
        assert torch.isfinite(grad).all(), (type(loss).__name__, grad)


def test_a_last_pt_saved_before_any_evaluation_predicts_at_the_default_threshold():
    saved = {"task": "multilabel", "class_names": NAMES, "thresholds": None}
    with pytest.warns(UserWarning, match="before an evaluation chose its thresholds"):
        assert thresholds_of(saved, None, "last.pt") == [DEFAULT_THRESHOLD] * len(NAMES)
    assert thresholds_of(saved, 0.3, "last.pt") == [0.3] * len(NAMES)
