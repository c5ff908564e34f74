import copy

import torch
import torchvision

from finetune.config.schema import TrainConfig
from finetune.model.schedule import Schedule


def snapshot(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def changed(before, after, keys):
    return {k for k in keys if not torch.equal(before[k], after[k])}


def names(trainer):
    head = {k for k in trainer.model.state_dict() if k.startswith(trainer.built.head_name + ".")}
    bn_stats = {k for k in trainer.model.state_dict() if k.endswith(("running_mean", "running_var"))}
    params = {n for n, _ in trainer.model.named_parameters()}
    return head, params - head, bn_stats


def test_shorthand_is_one_backbone_stage():
    model = torchvision.models.resnet18(num_classes=3)

    def stages(**kw):
        schedule = Schedule(TrainConfig(epochs=4, **kw), model, "fc", steps_per_epoch=5)
        return [schedule.stage(e) for e in (1, 2, 3, 4)]

    assert stages(unfreeze_epoch=2) == ["head", "head", "backbone", "backbone"]
    assert stages(unfreeze_epoch=None) == ["head"] * 4
    assert stages(freeze_backbone=True) == ["head"] * 4, "frozen alone is feature extraction: it never unfreezes"
    assert stages(freeze_backbone=False) == ["backbone"] * 4


def test_only_head_trains_while_frozen_then_everything_with_its_own_lr(make_trainer):
    trainer = make_trainer("train.epochs=2", "train.unfreeze_epoch=1", "train.feature_cache=off")
    head, backbone, bn_stats = names(trainer)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["head", "backbone"], "every group from step 0"
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3

    before = snapshot(trainer)
    trainer.run_epoch(1)
    after = snapshot(trainer)
    assert changed(before, after, head) == head
    assert changed(before, after, backbone) == set()
    assert changed(before, after, bn_stats) == set(), "freeze_bn keeps BatchNorm statistics fixed"

    trainer.run_epoch(2)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == ["head", "backbone"]
    assert (groups["head"]["lr"], groups["backbone"]["lr"]) == (1e-3, 1e-4)
    head_params = list(trainer.model.get_submodule(trainer.built.head_name).parameters())
    backbone_params = [p for p in trainer.model.parameters() if all(p is not h for h in head_params)]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in backbone_params}
    final = snapshot(trainer)
    assert changed(after, final, backbone) == backbone
    assert changed(after, final, bn_stats) == bn_stats

    rows = trainer.book.log.rows
    assert [r["stage"] for r in rows] == ["head", "backbone"]
    assert [r["lr_backbone"] for r in rows] == [0.0, 1e-4]
    total = sum(p.numel() for p in trainer.model.parameters())
    assert rows[0]["trainable_params"] == sum(p.numel() for p in head_params) < total
    assert rows[1]["trainable_params"] == total


def test_without_freeze_bn_batchnorm_statistics_adapt_while_frozen(make_trainer):
    trainer = make_trainer("train.epochs=1", "train.unfreeze_epoch=null", "train.freeze_bn=false")
    _, backbone, bn_stats = names(trainer)
    before = snapshot(trainer)
    trainer.run_epoch(1)
    after = snapshot(trainer)
    assert changed(before, after, backbone) == set()
    assert changed(before, after, bn_stats) == bn_stats


def test_finetune_all_trains_everything_from_the_start(make_trainer):
    trainer = make_trainer("train.freeze_backbone=false", "train.epochs=1")
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["head", "backbone"]
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_head_trained_on_cached_features_matches_uncached(make_trainer):
    """The cache draws the same flips in the same order: same head weights."""
    heads = []
    for cache in ("auto", "off"):
        trainer = make_trainer("train.epochs=2", "train.unfreeze_epoch=null", f"train.feature_cache={cache}")
        trainer.run_epoch(1)
        trainer.run_epoch(2)
        assert (trainer.features.cache is not None) == (cache == "auto")
        heads.append([p.detach().clone() for p in trainer.head.parameters()])
    for cached, uncached in zip(*heads, strict=True):
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-5)


def test_cache_computes_only_the_variants_the_frozen_epochs_draw(make_trainer):
    trainer = make_trainer("train.epochs=2", "train.unfreeze_epoch=1")
    trainer.run_epoch(1)
    n = len(trainer.data.train)
    held = trainer.features.cache.slot >= 0
    assert int(held.sum()) == len(trainer.features.cache.train) == n, "one frozen epoch needs one variant per image"
    assert held.any(dim=0).all()


def test_feature_cache_on_disk_is_reused_by_a_later_run(make_trainer):
    first = make_trainer("train.epochs=3", "train.unfreeze_epoch=null", run_name="a")
    first.run_epoch(1)
    files = list(first.features.store.folder.glob("*.pt"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    second = make_trainer("train.epochs=3", "train.unfreeze_epoch=null", run_name="b")
    second.run_epoch(1)
    assert files[0].stat().st_mtime_ns == written, "nothing new to compute, nothing rewritten"
    torch.testing.assert_close(second.features.cache.train, first.features.cache.train, rtol=0, atol=0)
    for a, b in zip(first.head.parameters(), second.head.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_saved_in_another_memory_layout_steps_as_the_unfused_optimizer_does():
    """The fused kernels read a parameter's state as laid out like the parameter, whatever its
    strides: state saved from a contiguous model and loaded into a channels_last one must be
    re-laid, or Adam's moments are read scrambled (silently wrong updates)."""
    from finetune.model.freezing import build_optimizer, load_optimizer_state

    cfg = TrainConfig(freeze_backbone=False)
    saved_model = torchvision.models.resnet18(num_classes=3)
    saved_opt = build_optimizer(cfg, saved_model, Schedule(cfg, saved_model, "fc", steps_per_epoch=5))
    for p in saved_model.parameters():
        p.grad = torch.randn_like(p)
    saved_opt.step()
    steps = {}
    for fused in (True, False):
        model = torchvision.models.resnet18(num_classes=3)
        model.load_state_dict(saved_model.state_dict())
        model.to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, model, Schedule(cfg, model, "fc", steps_per_epoch=5))
        opt.defaults["fused"] = opt.param_groups[0]["fused"] = opt.param_groups[1]["fused"] = fused
        saved = copy.deepcopy(saved_opt.state_dict())  # loading aliases the step counts, which a step bumps
        load_optimizer_state(opt, saved, [n for n, _ in model.named_parameters()])
        for p, q in zip(model.parameters(), saved_model.parameters(), strict=True):
            p.grad = torch.empty_like(p).copy_(q.grad)  # laid out as the parameter, as autograd does
        opt.step()
        steps[fused] = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    for name, value in steps[False].items():
        torch.testing.assert_close(steps[True][name], value, msg=name)
