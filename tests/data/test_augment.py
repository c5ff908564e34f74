"""Batched augmentation: per-sample randomness (TrivialAugment/RandAugment ops included),
determinism under (seed, rank, epoch, step) without colliding streams, label mixing, the cache
switched off, exact resume."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from finetune.config.load import load_config
from finetune.config.schema import AugmentConfig, CropConfig, JitterConfig
from finetune.data.augment import Augment

SAME = torch.rand(1, 3, 32, 32).repeat(6, 1, 1, 1)  # six copies of one image

needs_kornia = pytest.mark.skipif(importlib.util.find_spec("kornia") is None, reason="needs the augment extra")


def augment(rank: int = 0, **kw) -> Augment:
    return Augment(AugmentConfig(**kw), size=48, num_classes=3, seed=7, rank=rank)


# 32 copies of an image that is flat per channel: an intensity op keeps each channel flat, a
# geometric op (rotate, shear, translate) fills part of it with zeros
FLAT = torch.tensor([0.3, 0.5, 0.7]).view(1, 3, 1, 1).expand(32, 3, 16, 16).contiguous()


def moved(out: torch.Tensor) -> set[bool]:
    """Which of {moved by a geometric op, kept flat} occur across the batch."""
    return {bool((image != image[:, :1, :1]).any()) for image in out}


@needs_kornia
def test_each_image_of_a_batch_gets_its_own_crop_jitter_and_erasing():
    aug = augment(random_resized_crop=CropConfig(scale=[0.35, 1.0]), color_jitter=JitterConfig(0.3, 0.3, 0.3, 0.05))
    out = aug.images(SAME, epoch=1, step=0)
    assert out.shape == (6, 3, 48, 48)
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 6)), "per-sample parameters"
    erased = augment(random_erasing=1.0).images(SAME, epoch=1, step=0)
    assert len({tuple((e != SAME[0]).any(0).nonzero()[0].tolist()) for e in erased}) > 1, "patches differ"


@needs_kornia
def test_draws_are_a_function_of_seed_epoch_and_step_and_leave_the_global_rng_alone():
    aug = augment(random_resized_crop=CropConfig(), trivial_augment=True)
    before = torch.get_rng_state()
    a, b = aug.images(SAME, 2, 5), aug.images(SAME, 2, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, aug.images(SAME, 2, 6)) and not torch.equal(a, aug.images(SAME, 3, 5))
    assert torch.equal(torch.get_rng_state(), before), "dropout's RNG is untouched"


@needs_kornia
def test_streams_never_collide_and_each_rank_draws_its_own():
    crop = CropConfig(scale=[0.35, 1.0])
    rank0, rank1 = augment(random_resized_crop=crop), augment(rank=1, random_resized_crop=crop)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    before = torch.get_rng_state()
    assert not torch.equal(rank0.images(SAME, 1, 10_007), rank0.images(SAME, 2, 0)), "collided under the affine seed"
    assert not torch.equal(rank0.images(SAME, 1, 0), rank1.images(SAME, 1, 0))
    assert torch.equal(rank1.images(SAME, 1, 0), rank1.images(SAME, 1, 0)), "a pure function: resume is exact"
    mixed0, mixed1 = (augment(rank=r, mixup=0.4).mix(x, labels, 1, 0)[1] for r in (0, 1))
    assert not torch.equal(mixed0, mixed1)
    assert torch.equal(torch.get_rng_state(), before), "dropout's RNG is untouched"


@needs_kornia
def test_kornias_policies_pick_one_op_per_batch():
    """Why `_PerImage` exists: every image of a kornia TrivialAugment/RandAugment call gets the same ops."""
    from kornia.augmentation.auto import RandAugment, TrivialAugment

    torch.manual_seed(0)
    assert all(len(moved(policy(FLAT))) == 1 for policy in [TrivialAugment(), RandAugment(n=2, m=10)] * 8)


@needs_kornia
@pytest.mark.parametrize("policy", ["trivial_augment", "rand_augment"])
def test_trivial_and_rand_augment_pick_their_ops_per_image(policy):
    aug = augment(**{policy: True})
    for step in range(3):  # per batch: one kind per batch; per image: both, but for a 1e-7 chance
        out = aug.images(FLAT, epoch=1, step=step)
        assert out.shape == FLAT.shape and moved(out) == {True, False}
    assert torch.equal(aug.images(FLAT, 1, 0), aug.images(FLAT, 1, 0))


def test_mixup_and_cutmix_mix_images_and_labels():
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    mixed, targets = augment(mixup=0.4).mix(x, labels, 1, 0)
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(1), torch.ones(4))
    assert (targets.max(1).values < 1).any(), "soft labels"
    lam = targets[0, 0].item() if labels[0] != labels[-1] else targets[1, 1].item()
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6), (
        "torchvision pairs each with the one before"
    )
    cut, cut_targets = augment(cutmix=1.0).mix(x, labels, 1, 0)
    changed = (cut != x).any(1)
    assert changed.any() and not changed.all(), "a box is pasted"
    assert torch.allclose(cut_targets.sum(1), torch.ones(4))


def test_bad_augment_values_are_config_errors():
    with pytest.raises(Exception, match=r"data\.augment\.random_resized_crop\.scale = \[0\.5, 0\.2\]"):
        load_config(None, ["data.augment.random_resized_crop.scale=[0.5, 0.2]"])
    with pytest.raises(Exception, match=r"data\.augment\.color_jitter\.hue = 0\.9 must be in \[0, 0\.5\]"):
        load_config(None, ["data.augment.color_jitter={hue: 0.9}"])


AUGMENTED = ["data.augment={random_resized_crop: {scale: [0.5, 1]}, color_jitter: {brightness: 0.2}, mixup: 0.2}"]


@needs_kornia
def test_augmented_training_skips_the_cache_and_resumes_exactly(make_trainer):
    reference = make_trainer(*AUGMENTED, "train.epochs=2", run_name="reference")
    reference.run_epoch(1)
    assert reference.features.cache is None
    assert "data.augment changes images per sample" in reference.features.decision.note
    state = copy.deepcopy(reference.resume_state(metrics={}))
    reference.run_epoch(2)
    resumed = make_trainer(*AUGMENTED, "train.epochs=2", run_name="resumed")
    resumed.restore(state)
    resumed.run_epoch(2)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert reference.book.log.rows[-1]["train_loss"] == resumed.book.log.rows[-1]["train_loss"]
