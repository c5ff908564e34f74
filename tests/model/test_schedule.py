"""The schedule unit: stages, per-group LRs across every unfreeze, plan = train, early stopping."""

from __future__ import annotations

import copy
import json
import math
import re

import pandas as pd
import pytest
import torch
import torchvision

from finetune.cli import main
from finetune.config.load import load_config
from finetune.config.schema import SchedulerConfig, StageConfig, TrainConfig
from finetune.model.schedule import Schedule

STEPS = 10  # steps per epoch in the pure tests
THREE_STAGES = [
    "train.epochs=4",
    "train.unfreeze_epoch=null",  # the tiny config's shorthand gives way to the stages
    "train.unfreeze=[{epoch: 1, modules: [layer4]}, {epoch: 2, modules: [layer3]}, {epoch: 3, modules: [backbone]}]",
    "train.layer_lr_decay=0.5",
    "train.scheduler={name: cosine, warmup_epochs: 0.5}",
    "train.unfreeze_warmup_epochs=0.5",
]


def resnet() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=3)


def schedule(scheduler: dict | None = None, **train) -> Schedule:
    cfg = TrainConfig(scheduler=SchedulerConfig(**(scheduler or {})), **train)
    return Schedule(cfg, resnet(), "fc", steps_per_epoch=STEPS)


def lrs(s: Schedule, group: str) -> list[float]:
    g = next(g for g in s.groups if g.name == group)
    return [s.lr(g, step) for step in range(s.total_steps)]


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "step", "onecycle"])
def test_every_scheduler_carries_a_joining_group_across_the_unfreeze(name):
    s = schedule(
        epochs=4,
        unfreeze_epoch=1,
        scheduler={"name": name, "min_lr_ratio": 0.1, "step_epochs": 1},
        unfreeze_warmup_epochs=0.5,
    )
    head, backbone = lrs(s, "head"), lrs(s, "backbone")
    assert backbone[:STEPS] == [0.0] * STEPS, "a group has LR 0 before its stage"
    warm = backbone[STEPS : STEPS + 5]
    assert warm == sorted(warm) and warm[0] < warm[-1], "its own warmup after the unfreeze"
    after = range(STEPS + 5, 4 * STEPS)
    for step in after:  # then the rest of the run's curve, relative to its own base LR
        assert backbone[step] / 1e-4 == pytest.approx(head[step] / 1e-3)
    if name != "constant":
        assert len({backbone[step] for step in after}) > 1, "never stuck at a constant LR"
        assert backbone[-1] < backbone[STEPS + 5]
    if name in ("cosine", "linear"):
        assert head[-1] == pytest.approx(1e-4, rel=0.25), "down to min_lr_ratio by the end"
    if name == "step":
        assert head[STEPS - 1] == 1e-3 and head[STEPS] == pytest.approx(1e-4)


def test_warmup_is_fractional_and_onecycle_starts_at_a_25th():
    s = schedule(epochs=2, freeze_backbone=False, scheduler={"name": "cosine", "warmup_epochs": 0.3})
    head = lrs(s, "head")
    assert head[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    one = lrs(schedule(epochs=2, freeze_backbone=False, scheduler={"name": "onecycle"}), "head")
    assert one[0] == pytest.approx(1e-3 * (1 / 25 + (24 / 25) / 6))  # 30% of 20 steps = 6 steps of warmup
    assert max(one) == pytest.approx(1e-3) and one.index(max(one)) == 5


def test_three_stages_groups_params_and_layer_lr_decay():
    stages = [
        StageConfig(epoch=1, modules=["layer4"]),
        StageConfig(epoch=2, modules=["layer3", "layer2"], name="middle"),
        StageConfig(epoch=3, modules=["backbone"], lr=1e-6),
    ]
    s = schedule(epochs=5, unfreeze=stages, lr_backbone=2e-4, layer_lr_decay=0.5)
    assert [(g.name, g.epoch, g.lr) for g in s.groups] == [
        ("head", 0, 1e-3),
        ("layer4", 1, 2e-4),
        ("middle", 2, 1e-4),
        ("backbone", 3, 1e-6),
    ]
    owners = {p: g.name for g in s.groups for p in g.params}
    assert len(owners) == len(dict(resnet().named_parameters())), "every parameter in exactly one group"
    assert owners["layer2.0.conv1.weight"] == "middle" and owners["conv1.weight"] == "backbone"
    assert [s.stage(e) for e in range(1, 6)] == ["head", "layer4", "middle", "backbone", "backbone"]
    assert [s.cache_cut(e) for e in range(1, 6)] == ["fc", "layer4", "layer2", None, None]
    assert list(s.stage_epochs(3)) == [3] and list(s.stage_epochs(4)) == [4, 5]
    assert s.module_trains("layer4.1.bn2", 2) and not s.module_trains("layer3.0.bn1", 2)


def test_shorthand_keeps_its_meaning():
    s = schedule(epochs=3, unfreeze_epoch=1)
    assert [(g.name, g.modules, g.epoch, g.lr) for g in s.groups] == [
        ("head", ("fc",), 0, 1e-3),
        ("backbone", ("backbone",), 1, 1e-4),
    ]
    assert lrs(s, "backbone") == [0.0] * STEPS + [1e-4] * 2 * STEPS


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"epoch": 1, "modules": ["layer5"]}], r"names no module 'layer5'.*did you mean layer4"),
        ([{"epoch": 1, "modules": ["layer4"]}, {"epoch": 2, "modules": ["layer4.1"]}], "overlaps stage 'layer4'"),
        ([{"epoch": 1, "modules": ["fc"]}], "holds the head 'fc'"),
        ([{"epoch": 1, "modules": ["backbone"], "name": "a"}, {"epoch": 2, "modules": ["backbone"]}], "one stage only"),
        ([{"epoch": 1, "modules": ["layer4"]}, {"epoch": 2, "modules": ["layer4"]}], "two .* named 'layer4'"),
    ],
)
def test_bad_stages_are_one_clear_line_from_plan_and_train(tmp_path, capsys, config_file, stages, message):
    config = str(config_file(train={"epochs": 3, "unfreeze": stages}))
    for command in (["plan", config], ["train", config]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert re.search(message, err), err
    assert not (tmp_path / "runs").exists(), "train stopped before the run dir was made"


def test_both_unfreeze_forms_and_late_stages_are_config_errors():
    with pytest.raises(Exception, match=r"drop train\.unfreeze_epoch"):
        load_config(None, ["train.unfreeze_epoch=1", "train.unfreeze=[{epoch: 1, modules: [layer4]}]"])
    with pytest.raises(Exception, match=r"train\.unfreeze\[0\]\.epoch = 3 must be between 0 and"):
        load_config(None, ["train.unfreeze=[{epoch: 3, modules: [layer4]}]"])


def test_three_stage_cosine_run_records_the_lrs_plan_printed(config_file, tmp_path, capsys):
    config = str(config_file())
    sets = ["--set", *THREE_STAGES, "data.batch_size=4"]
    assert main(["plan", config, "--json", *sets]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["train", config, "--run-dir", str(tmp_path / "run"), *sets]) == 0
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert results["stage"].tolist() == [e["stage"] for e in plan["epochs"]] == ["head", "layer4", "layer3", "backbone"]
    for row, epoch in zip(results.to_dict("records"), plan["epochs"], strict=True):
        for group, lr in epoch["lr_end"].items():
            assert row[f"lr_{group}"] == pytest.approx(lr, rel=1e-5, abs=1e-12), (row["epoch"], group)
        assert row["trainable_params"] == epoch["trainable_params"]
    assert [e["cache"].split(" ")[0] for e in plan["epochs"]] == ["head", "layer4", "layer3", "off:"]


def test_gradual_unfreeze_trains_each_stage_from_its_epoch(make_trainer):
    trainer = make_trainer(*THREE_STAGES, "train.feature_cache=off")
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    changed_per_epoch = []
    for epoch in range(1, 5):
        trainer.run_epoch(epoch)
        now = trainer.model.state_dict()
        changed_per_epoch.append({k.split(".")[0] for k, v in now.items() if not torch.equal(v, state[k])})
        state = {k: v.clone() for k, v in now.items()}
    assert changed_per_epoch[0] == {"fc"}
    assert changed_per_epoch[1] == {"fc", "layer4"}, "layer3's BatchNorm stays in eval mode until its stage"
    assert changed_per_epoch[2] == {"fc", "layer4", "layer3"}
    assert changed_per_epoch[3] >= {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    groups = [g["name"] for g in trainer.optimizer.param_groups]
    assert groups == ["head", "layer4", "layer3", "backbone"]


def test_partial_cache_trains_the_same_weights_as_the_full_forward(make_trainer):
    """Two stages on cached activations (fc, then layer4 + fc) against the same epochs uncached."""
    finals = []
    for cache in ("auto", "off"):
        stages = "train.unfreeze=[{epoch: 1, modules: [layer4]}]"
        trainer = make_trainer("train.epochs=3", "train.unfreeze_epoch=null", stages, f"train.feature_cache={cache}")
        for epoch in (1, 2, 3):
            trainer.run_epoch(epoch)
            if cache == "auto":
                assert trainer.features.cache.cut == ("fc" if epoch == 1 else "layer4")
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for key, value in finals[0].items():
        torch.testing.assert_close(value, finals[1][key], rtol=1e-4, atol=1e-5, msg=key)


def test_cache_falls_back_to_the_full_forward_where_the_model_is_no_chain(make_trainer):
    stage = "train.unfreeze=[{epoch: 0, modules: [layer4.0.conv2]}]"
    trainer = make_trainer("train.epochs=2", "train.unfreeze_epoch=null", stage)
    trainer.run_epoch(1)
    assert trainer.features.cache is None
    assert "not a chain of modules at layer4.0.conv2" in trainer.features.decision.note


def test_mobilenet_v2_is_a_chain_at_its_feature_blocks():
    from finetune.training.features import CutModel

    model = torchvision.models.mobilenet_v2(num_classes=3)
    assert CutModel(model, "features.17", "classifier.1").exact(32, torch.device("cpu")) == (160, 1, 1)
    assert CutModel(model, "classifier.1", "classifier.1").exact(32, torch.device("cpu")) == (1280,)


def test_early_stopping_resets_at_a_new_stage_and_is_reported(config_file, tmp_path, capsys):
    """A head LR of ~0 keeps val_acc flat: patience 2 runs out two epochs into each stage."""
    config = str(config_file())
    run = tmp_path / "run"
    sets = ["train.epochs=8", "train.unfreeze_epoch=2", "train.lr_head=1e-12", "train.lr_backbone=1e-12"]
    sets += ["train.early_stopping={patience: 2}"]
    assert main(["train", config, "--run-dir", str(run), "--set", *sets]) == 0
    out = capsys.readouterr().out
    results = pd.read_csv(run / "results.csv")
    assert results["epoch"].tolist() == [1, 2, 3, 4, 5], "epoch 3 starts the backbone stage, so not stopped at 3"
    assert "early stop after epoch 5: val_acc did not improve" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"]["epoch"] == 5
    assert main(["train", "--resume", str(run)]) == 0
    assert "stopped early at epoch 5" in capsys.readouterr().out
    assert len(pd.read_csv(run / "results.csv")) == 5
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert pd.read_csv(tmp_path / "cmp" / "comparison.csv")["epochs"].tolist() == ["5/8 (early stop)"]
    assert not math.isnan(summary["best_value"])


def test_a_run_saved_before_stages_existed_resumes(make_trainer):
    """last.pt files written before every group was in the optimizer hold only the groups that
    had joined (`head` before the unfreeze): they load by name and continue as before."""
    reference = make_trainer("train.epochs=2", "train.feature_cache=off", run_name="reference")
    reference.run_epoch(1)
    state = copy.deepcopy(reference.resume_state(metrics={}))  # its tensors alias the live model's
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["head"]
    reference.run_epoch(2)
    resumed = make_trainer("train.epochs=2", "train.feature_cache=off", run_name="old")
    resumed.restore(state)
    resumed.run_epoch(2)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_patience_running_out_on_the_last_epoch_leaves_the_run_extendable(config_file, tmp_path, capsys):
    """A run that reached its last epoch is finished, not stopped early: --resume can add epochs."""
    run = tmp_path / "run"
    sets = ["train.epochs=2", "train.unfreeze_epoch=null", "train.early_stopping={patience: 1, min_delta: 1.0}"]
    assert main(["train", str(config_file()), "--run-dir", str(run), "--set", *sets]) == 0
    assert json.loads((run / "summary.json").read_text())["stopped_early"] is None
    assert "early stop" not in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3"]) == 0
    assert pd.read_csv(run / "results.csv")["epoch"].tolist() == [1, 2, 3]


def test_every_column_plan_prints_is_what_train_does(make_trainer):
    """Issue 15 bug 5: stage, params, LRs at each epoch's first and last step, BatchNorm in
    train mode, the feature-cache decision (sized by the real dtype) and the runtime."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from finetune.plan import make_plan

    trainer = make_trainer(*THREE_STAGES, "train.memory_format=channels_last", "data.memory_budget_mb=1")
    plan = make_plan(trainer.cfg)
    bns = [m for m in trainer.model.modules() if isinstance(m, _BatchNorm)]
    seen: list[tuple[dict[str, float], int]] = []

    def record(optimizer, _args, _kwargs):
        seen.append(({g["name"]: g["lr"] for g in optimizer.param_groups}, sum(m.training for m in bns)))

    trainer.optimizer.register_step_pre_hook(record)
    for epoch in plan.epochs:
        seen.clear()
        trainer.run_epoch(epoch.epoch)
        row = trainer.book.log.rows[-1]
        assert (row["stage"], row["trainable_params"]) == (epoch.stage, epoch.trainable_params)
        assert (seen[0][0], seen[-1][0]) == (epoch.lr_start, epoch.lr_end)
        assert f"{seen[0][1]}/{len(bns)}" == epoch.bn_train
        assert trainer.features.decision.note == epoch.cache == row["feature_cache"]
        assert epoch.runtime == trainer.runtime.describe()
    assert plan.steps_per_epoch == trainer.schedule.steps_per_epoch
