import numpy as np
import pytest
import torch

from finetune.errors import FinetuneError
from finetune.losses import class_weights

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
