import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError
from finetune.training.losses import WeightedCrossEntropy, class_weights

NAMES = ["a", "b", "c", "d"]


def test_balanced_classes_get_equal_weights():
    w = class_weights("auto", np.array([5, 5, 5, 5]), NAMES)
    assert torch.allclose(w, torch.ones(4))


def test_rare_classes_weigh_more_in_inverse_proportion():
    w = class_weights("auto", np.array([30, 10, 10, 10]), NAMES)
    assert w[1] / w[0] == pytest.approx(3.0)
    # sklearn's "balanced": the weighted count of every class is the same
    assert (w * torch.tensor([30, 10, 10, 10])).tolist() == pytest.approx([15.0] * 4)


def test_missing_class_gets_zero_and_one_warning_naming_it():
    with pytest.warns(UserWarning, match=r"no training samples for c, d") as caught:
        w = class_weights("auto", np.array([60, 40, 0, 0]), NAMES)
    assert len(caught) == 1
    assert w[2] == 0 and w[3] == 0
    # the seen classes keep real weight (the seed's formula left them near zero)
    assert w[0] > 0.5 and w[1] > 0.5


def test_none_means_plain_cross_entropy():
    assert class_weights("none", np.array([1, 2, 3, 4]), NAMES) is None


def test_explicit_list_must_have_one_weight_per_class():
    with pytest.raises(FinetuneError, match="has 3 values but the dataset has 4 classes"):
        class_weights([1.0, 2.0, 3.0], np.array([1, 1, 1, 1]), NAMES)


def test_mapping_by_name_or_index_and_unknown_class():
    w = class_weights({"b": 2.0, 3: 0.5}, np.array([1, 1, 1, 1]), NAMES)
    assert w.tolist() == [1.0, 2.0, 1.0, 0.5]
    with pytest.raises(FinetuneError, match="'zebra' is not a class"):
        class_weights({"zebra": 2.0}, np.array([1, 1, 1, 1]), NAMES)


# the batch: six samples of class 0, one each of the classes weighted 10
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
LOGITS = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
WEIGHT = torch.tensor([1.0, 10.0, 10.0])


@pytest.mark.parametrize("weight", [None, WEIGHT])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_indices_give_torchs_cross_entropy(weight, smoothing):
    expected = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(LOGITS, LABELS)
    assert WeightedCrossEntropy(weight, smoothing)(LOGITS, LABELS).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("weight", [None, WEIGHT])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_targets_give_the_same_loss_as_their_class_indices(weight, smoothing):
    loss = WeightedCrossEntropy(weight, smoothing)
    one_hot = F.one_hot(LABELS, 3).float()
    assert loss(LOGITS, one_hot).item() == pytest.approx(loss(LOGITS, LABELS).item(), rel=1e-6)
    if weight is not None:  # torch divides soft targets by the batch size instead (the bug)
        torch_soft = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(LOGITS, one_hot)
        assert torch_soft.item() > 2 * loss(LOGITS, one_hot).item()


def test_soft_targets_are_normalised_by_their_summed_class_weights():
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]])
    logits = LOGITS[:2]
    logp = logits.log_softmax(1)
    per_sample = -(targets * WEIGHT * logp).sum(1)
    expected = per_sample.sum() / (0.7 * 1 + 0.3 * 10 + 0.2 * 10 + 0.8 * 10)
    assert WeightedCrossEntropy(WEIGHT)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unweighted_soft_targets_give_torchs_batch_mean():
    targets = torch.rand(8, 3).softmax(1)
    expected = nn.CrossEntropyLoss(label_smoothing=0.1)(LOGITS, targets)
    assert WeightedCrossEntropy(None, 0.1)(LOGITS, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_weight_moves_with_the_module_and_gradients_match_torchs():
    assert WeightedCrossEntropy(WEIGHT).double().weight.dtype == torch.float64, "a buffer, so .to(device) moves it"
    logits = LOGITS.clone().requires_grad_()
    WeightedCrossEntropy(WEIGHT)(logits, LABELS).backward()
    expected = LOGITS.clone().requires_grad_()
    nn.CrossEntropyLoss(weight=WEIGHT)(expected, LABELS).backward()
    assert torch.allclose(logits.grad, expected.grad, atol=1e-6)


def test_evaluation_scores_match_sklearns_with_a_class_missing_from_truth_and_from_predictions():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    from finetune.training.evaluator import score

    rng = np.random.default_rng(0)
    truth = rng.choice([0, 1, 3], size=50)  # class c has no validation images
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    logits[:, 1] -= 10  # and class b is never predicted
    result = score(logits, torch.from_numpy(truth), NAMES)
    preds = logits.argmax(1).numpy()
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn too leaves class c out
        expected = balanced_accuracy_score(truth, preds)
    assert result.balanced_acc == pytest.approx(expected)
    assert (result.confusion == confusion_matrix(truth, preds, labels=range(4))).all()
    assert math.isnan(result.per_class["c"]) and result.per_class["b"] == 0.0
    assert result.acc == pytest.approx((preds == truth).mean())


def test_auto_weights_match_sklearns_balanced_rule():
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.array([30, 7, 0, 12])
    with pytest.warns(UserWarning):
        w = class_weights("auto", counts, NAMES)
    present = np.array([0, 1, 3])
    expected = compute_class_weight("balanced", classes=present, y=np.repeat(present, counts[present]))
    assert w[present].tolist() == pytest.approx(expected.tolist())
