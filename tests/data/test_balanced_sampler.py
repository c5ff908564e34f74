"""data.sampler balanced, its units: class-balanced draws with replacement as a function of
(seed, epoch), dealt to torchrun's ranks as the shuffled order is; class_weights auto yields.
Training with it (resume, streaming, torchrun): tests/training/test_sampler.py."""

from __future__ import annotations

import pytest
import torch

from finetune.config.load import load_config
from finetune.data.batching import epoch_plan, sampling_weights
from finetune.errors import FinetuneError
from finetune.runtime.distributed import Ranks, shard
from finetune.training.balance import decide_balance
from finetune.training.features import needed_variants

LABELS = torch.tensor([0] * 600 + [1] * 60 + [2] * 6)  # 100:10:1


def test_balanced_draws_are_class_balanced_in_expectation_and_one_epoch_long():
    weights = sampling_weights("balanced", LABELS)
    counts = torch.zeros(3)
    for epoch in range(1, 11):
        order, _ = epoch_plan(len(LABELS), 0, epoch, True, weights)
        assert len(order) == len(LABELS)
        counts += torch.bincount(LABELS[order], minlength=3)
    shares = counts / counts.sum()
    assert ((shares > 0.28) & (shares < 0.39)).all(), shares  # 1/3 each; shuffling gives 0.90/0.09/0.01


def test_the_same_seed_and_epoch_draw_the_same_and_the_flips_are_the_shuffled_epochs():
    weights = sampling_weights("balanced", LABELS)
    a, b = epoch_plan(666, 5, 3, True, weights), epoch_plan(666, 5, 3, True, weights)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], epoch_plan(666, 5, 4, True, weights)[0])
    assert not torch.equal(a[0], epoch_plan(666, 6, 3, True, weights)[0])
    shuffled = epoch_plan(666, 5, 3, True)
    assert torch.equal(a[1], shuffled[1])
    drawn = needed_variants(666, 5, range(1, 4), True, weights=weights)
    assert not (drawn & ~needed_variants(666, 5, range(1, 4), True)).any(), "the cache budget bounds both"
    assert sampling_weights("shuffle", LABELS) is None


def test_two_ranks_draw_disjoint_shares_whose_union_is_the_epochs_draw():
    """shard deals positions of the draw: an image drawn twice may go to both ranks, once each."""
    order, _ = epoch_plan(len(LABELS), 0, 1, True, sampling_weights("balanced", LABELS))
    positions = [shard(torch.arange(len(order)), Ranks(rank, 2)) for rank in (0, 1)]
    assert not set(positions[0].tolist()) & set(positions[1].tolist())
    shares = [shard(order, Ranks(rank, 2)) for rank in (0, 1)]
    assert all(torch.equal(s, order[p]) for s, p in zip(shares, positions, strict=True))
    assert torch.equal(torch.cat(shares).sort().values, order.sort().values)


def test_class_weights_auto_yields_to_the_sampler_and_given_weights_do_not():
    auto = decide_balance(load_config(None, ["data.sampler=balanced"]))
    assert auto.class_weights == "none" and "class_weights auto is off" in auto.note
    given = decide_balance(load_config(None, ["data.sampler=balanced", "train.class_weights=[1, 2, 3]"]))
    assert given.class_weights == [1, 2, 3] and "weigh the loss too" in given.note
    shuffled = decide_balance(load_config(None, []))
    assert shuffled.class_weights == "auto" and shuffled.note == ""


def test_an_unknown_sampler_is_one_line():
    with pytest.raises(FinetuneError, match=r"^config: data\.sampler = 'weighted' is invalid; expected one of"):
        load_config(None, ["data.sampler=weighted"])
