"""Issue 19, training: the weight average (EMA), gradient clipping, gradient accumulation and
no weight decay on norm layers and biases."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_imagefolder, tiny_config, write_config
from processes import Finetune, assert_same_as_reference, resume, stop_when, with_reference
from torch import nn

from finetune.cli import main
from finetune.config.load import apply_override, from_dict, load_config
from finetune.config.schema import EmaConfig, TrainConfig
from finetune.data.sources import load_data
from finetune.model.build import IMAGENET_MEAN, IMAGENET_STD, BuiltModel
from finetune.model.freezing import build_optimizer, decays, schedule_group
from finetune.model.schedule import Schedule
from finetune.plan import make_plan
from finetune.runtime.resolve import resolve_runtime
from finetune.training.ema import WeightAverage
from finetune.training.loop import Trainer


def test_weight_average_warms_up_its_decay_copies_buffers_and_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    ema = WeightAverage(model, EmaConfig(decay=0.99, warmup=True))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the frozen bias too: a frozen parameter's average is never touched
        model[1].running_mean.fill_(5.0)
    ema.update()  # decay min(0.99, 1 / 10)
    torch.testing.assert_close(ema.average["0.weight"], start["0.weight"] + 0.9)
    assert torch.equal(ema.average["0.bias"], start["0.bias"])
    assert torch.equal(ema.average["1.running_mean"], model[1].running_mean)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()  # decay min(0.99, 2 / 11)
    torch.testing.assert_close(ema.average["0.weight"], start["0.weight"] + 0.9 + (1 - 2 / 11) * 1.1)
    assert ema.updates == 2


def test_ema_weights_are_validated_and_kept_in_best_pt_on_cached_and_full_evaluation(make_trainer):
    """Epoch 1 trains the head on cached activations and evaluates the average's head above
    the cut; epoch 2 trains everything and evaluates full images. The live weights come back."""
    trainer = make_trainer("train.epochs=2", "train.unfreeze_epoch=1", "train.ema={decay: 0.9}")
    run = trainer.run_dir
    for epoch in (1, 2):
        trainer.run_epoch(epoch)
        assert epoch == 1 or trainer.features.cache is None
        best, last = (torch.load(run / name, weights_only=True) for name in ("best.pt", "last.pt"))
        if best["epoch"] != epoch:
            continue
        for key, value in trainer.ema.average.items():
            assert torch.equal(best["model"][key], value.cpu()), key
            assert torch.equal(last["ema"]["weights"][key], value.cpu()), key
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(last["model"][key], value), f"{key}: the live weights are back after evaluation"
        assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])
    row = trainer.book.log.rows[-1]
    assert [r["val_weights"] for r in trainer.book.log.rows] == ["ema", "ema"]
    assert trainer.ema.updates == 2 * len(trainer.batches.epoch(1, 0, None, None).index)
    assert trainer.evaluate(None, None).loss == pytest.approx(row["val_loss"], rel=1e-6)
    trainer.evaluate.ema = None
    assert trainer.evaluate(None, None).loss != pytest.approx(row["val_loss"], rel=1e-3), "the live model differs"


def grad_norms(optimizer: torch.optim.Optimizer) -> list[float]:
    """The trainable parameters' global grad norm as each optimizer step sees it."""
    norms: list[float] = []

    def record(opt, _args, _kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    optimizer.register_step_pre_hook(record)
    return norms


def test_grad_clip_norm_bounds_the_global_norm_of_each_step(make_trainer):
    runs = {}
    for clip in ("null", "0.05"):
        trainer = make_trainer("train.epochs=1", "train.freeze_backbone=false", f"train.grad_clip_norm={clip}")
        runs[clip] = grad_norms(trainer.optimizer)
        trainer.run_epoch(1)
    assert min(runs["null"]) > 0.05, "unclipped, every step's norm is larger than the bound"
    assert runs["0.05"] == pytest.approx([0.05] * len(runs["null"]), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_grad_clip_norm_under_fp16_clips_the_unscaled_gradients(make_trainer):
    trainer = make_trainer(
        "device=cuda", "precision=fp16", "train.epochs=1", "train.freeze_backbone=false", "train.grad_clip_norm=0.05"
    )
    norms = grad_norms(trainer.optimizer)
    trainer.run_epoch(1)
    assert trainer.scaler.get_scale() > 1
    assert norms == pytest.approx([0.05] * len(norms), rel=1e-3), "scaled gradients clipped would be tiny"


def no_batchnorm_trainer(tmp_path: Path, data: Path, *overrides: str) -> Trainer:
    """A Trainer on a small conv net without BatchNorm: batch statistics would tell batches apart."""
    raw = tiny_config(data, tmp_path / "runs")
    for item in ("train.freeze_backbone=false", "train.epochs=2", "train.scheduler={name: cosine, warmup_epochs: 0.5}"):
        apply_override(raw, item)
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    built = BuiltModel(model, "4", IMAGENET_MEAN, IMAGENET_STD)
    return Trainer(cfg, load_data(cfg.data), built, resolve_runtime(cfg), tmp_path / "run")


def test_two_accumulated_batches_of_16_train_as_one_batch_of_32(tmp_path):
    """36 images: batches [32, 4] against [16, 16] + [4]; the schedule counts optimizer steps."""
    data = make_imagefolder(tmp_path / "data", train_per_class=12)
    trainers = [
        no_batchnorm_trainer(tmp_path / "big", data, "data.batch_size=32"),
        no_batchnorm_trainer(tmp_path / "acc", data, "data.batch_size=16", "train.accumulate_steps=2"),
    ]
    start = {k: v.clone() for k, v in trainers[0].model.state_dict().items()}
    for trainer in trainers:
        assert trainer.schedule.steps_per_epoch == 2
        trainer.run_epoch(1)
        trainer.run_epoch(2)
    big, accumulated = trainers
    for key, value in big.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(accumulated.book.log.rows, big.book.log.rows, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert ours["lr_head"] == theirs["lr_head"]
    assert not torch.equal(big.model.state_dict()["4.weight"], start["4.weight"]), "the weights trained"


def test_plan_counts_optimizer_steps_of_accumulated_batches(config_file, capsys):
    config = config_file(data={"batch_size": 4}, train={"accumulate_steps": 4})  # 24 images: 6 batches
    plan = make_plan(load_config(config))
    assert (plan.steps_per_epoch, plan.accumulate_steps) == (2, 4)
    assert main(["plan", str(config)]) == 0
    assert "2 optimizer steps per epoch of 4 batches each" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_leaves_norm_layers_and_biases_alone(optimizer):
    """A step on zero gradients moves only what weight decay pulls towards 0."""
    for old_behaviour in (False, True):
        model = torchvision.models.resnet18(num_classes=3)
        cfg = TrainConfig(
            weight_decay=0.1, freeze_backbone=False, optimizer=optimizer, decay_norm_and_bias=old_behaviour
        )
        opt = build_optimizer(cfg, model, Schedule(cfg, model, "fc", steps_per_epoch=5))
        assert opt.defaults["fused"], "a CPU model's optimizer steps with the fused kernel"
        names = [g["name"] for g in opt.param_groups]
        split = ["head", "head/no_decay", "backbone", "backbone/no_decay"]
        assert names == (["head", "backbone"] if old_behaviour else split)
        for p in model.parameters():
            p.detach().fill_(0.5)  # nothing at 0, where decay would not show
            p.grad = torch.zeros_like(p)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        expected = set(before) if old_behaviour else {n for n, p in model.named_parameters() if decays(n, p)}
        assert moved == expected
        assert "bn1.weight" in set(before) - expected or old_behaviour


def test_a_run_saved_before_no_decay_groups_resumes_by_parameter_name(make_trainer):
    """Old last.pt files hold one unnamed-parameter group per schedule group."""
    sets = ("train.epochs=2", "train.freeze_backbone=false", "train.feature_cache=off", "train.weight_decay=0.01")
    reference = make_trainer(*sets, run_name="reference")
    reference.run_epoch(1)
    state = copy.deepcopy(reference.resume_state(metrics={}))
    order = [n for n, _ in reference.model.named_parameters()]
    merged: dict[str, dict] = {}
    for group in state["optimizer"]["param_groups"]:
        name = schedule_group(group["name"])
        old = merged.setdefault(name, {**group, "name": name, "params": [], "param_names": []})
        old["params"], old["param_names"] = old["params"] + group["params"], old["param_names"] + group["param_names"]
    for group in merged.values():
        pairs = sorted(zip(group.pop("param_names"), group["params"], strict=True), key=lambda p: order.index(p[0]))
        group["params"] = [index for _, index in pairs]
    state["optimizer"]["param_groups"] = list(merged.values())
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["head", "backbone"]
    reference.run_epoch(2)
    resumed = make_trainer(*sets, run_name="old")
    resumed.restore(state)
    resumed.run_epoch(2)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.process
def test_sigterm_inside_an_accumulated_step_with_ema_and_clipping_resumes_bit_identical(tmp_path):
    train = {"epochs": 2, "unfreeze_epoch": 1, "ema": {"decay": 0.9}, "grad_clip_norm": 1.0, "accumulate_steps": 2}
    config, reference = with_reference(tmp_path, train)
    run = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: proc.bar_at("epoch 2", steps=3), signal.SIGTERM) == 143
    step = torch.load(run / "last.pt", weights_only=True)["progress"]["step"]
    assert step > 0 and step % 2 == 0, "stopped mid-epoch 2, on an optimizer step's boundary"
    resume(run)
    assert_same_as_reference(run, reference)
    ours, theirs = (torch.load(r / "last.pt", weights_only=True)["ema"] for r in (run, reference))
    assert ours["updates"] == theirs["updates"] == 2 * 15
    for key, value in theirs["weights"].items():
        assert torch.equal(ours["weights"][key], value), f"EMA {key} differs after resume"


@pytest.mark.process
def test_accumulation_with_ema_under_torchrun_keeps_the_ranks_identical(tmp_path):
    """Two gloo processes; a step's first batches skip DDP's all-reduce (no_sync), its last one
    reduces the sums. The loop checks the weights are identical on both ranks after each epoch."""
    from processes import Torchrun

    data = make_imagefolder(tmp_path / "data", train_per_class=20, val_per_class=6)
    train = {"epochs": 2, "unfreeze_epoch": 1, "ema": {"decay": 0.9}, "grad_clip_norm": 1.0, "accumulate_steps": 2}
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train=train)
    proc = Torchrun(tmp_path / "logs", "train", config, "--run-dir", tmp_path / "run")
    out = proc.finish()
    assert proc.returncode == 0, out + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    assert proc.rank_log(0, "stdout").count("weights identical on 2 ranks") == 2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["ema"]["updates"] == 2 * 4, "60 images, 30 per rank: 8 batches of 4, 4 optimizer steps per epoch"
