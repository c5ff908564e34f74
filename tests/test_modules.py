"""`finetune modules`: the module tree a stage names, its groups under the config, and the names
a stage takes exactly as the stage check takes them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from finetune.cli import main
from finetune.config.load import load_config
from finetune.config.schema import StageConfig
from finetune.errors import FinetuneError
from finetune.model.build import skeleton
from finetune.model.schedule import check_stages
from finetune.modules import FROZEN, ModuleListing, list_modules, render

STAGED = [{"epoch": 1, "modules": ["layer4"], "name": "top"}, {"epoch": 2, "modules": ["layer3", "layer2.1"]}]


def listing(config: str, *sets: str, depth: int | None = None) -> ModuleListing:
    return list_modules(load_config(config, list(sets)), depth)


def tree(out: str) -> dict[str, list[str]]:
    """The printed rows: module name -> its other cells (type, params, unfreeze, group)."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("module "))
    rows = lines[first + 1 : -1]
    return {line.split()[0]: line.split(None, 4)[1:] for line in rows}


def test_resnet18_lists_its_blocks_with_sizes_groups_and_what_a_stage_takes(config_file, capsys):
    assert main(["modules", str(config_file())]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet18: 11.2M parameters; head fc (1.5K, 3 classes)")
    assert max(map(len, out.splitlines())) <= 100
    rows = tree(out)
    blocks = [f"layer{i}{b}" for i in range(1, 5) for b in ("", ".0", ".1")]
    assert list(rows) == ["conv1", "bn1", "relu", "maxpool", *blocks, "avgpool", "fc"]
    assert rows["conv1"] == ["Conv2d", "9.4K", "yes", "backbone"]
    assert rows["layer4"] == ["Sequential", "8.4M", "yes", "backbone"]
    assert rows["relu"] == ["ReLU", "0", "no", "-"]
    assert rows["fc"] == ["Linear", "1.5K", "no", "head"], "the head always trains: no stage takes it"
    assert "\n  layer4.0  " in out, "a block is indented under its layer"


def test_mobilenet_v2_shows_every_features_block_a_stage_can_name(config_file):
    top = [f"features.{i}" for i in range(14, 19)]
    stage = f"train.unfreeze=[{{epoch: 1, modules: {top}}}]"
    found = listing(str(config_file()), "model.arch=mobilenet_v2", "train.unfreeze_epoch=null", stage)
    rows = {r.name: r for r in found.rows}
    assert [n for n in rows if n.startswith("features.")] == [f"features.{i}" for i in range(19)]
    assert rows["features.14"].stage_takes and rows["features.14"].level == 2
    assert rows["features.14"].groups == ["+".join(top)] and rows["features.13"].groups == [FROZEN]
    assert max(map(len, render(found).splitlines())) <= 100, "a stage of many modules still fits"
    assert not rows["classifier"].stage_takes and rows["classifier.1"].groups == ["head"]
    assert "features.14.conv" in found.stage_names
    deeper = listing(str(config_file()), "model.arch=mobilenet_v2", depth=3)
    assert "features.14.conv" in {r.name for r in deeper.rows}


@pytest.mark.extras
def test_a_timm_model_lists_its_stages_and_a_head_module_shared_with_the_backbone(config_file):
    pytest.importorskip("timm")
    found = listing(str(config_file()), "model.arch=timm/convnext_atto")
    rows = {r.name: r for r in found.rows}
    assert found.head == "head.fc" and rows["head.fc"].groups == ["head"]
    assert all(rows[f"stages.{i}"].stage_takes for i in range(4))
    assert rows["head"].groups == ["head", "backbone"] and rows["head.norm"].stage_takes


def test_a_staged_config_shows_each_module_in_its_stage_and_the_groups_plan_shows(config_file, capsys):
    config = str(config_file(train={"epochs": 4, "unfreeze": STAGED}))
    assert main(["modules", config, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    groups = {r["name"]: r["groups"] for r in shown["rows"]}
    assert groups["layer4"] == groups["layer4.1"] == ["top"]
    assert groups["layer2"] == ["layer3+layer2.1", FROZEN] and groups["layer2.0"] == [FROZEN]
    assert groups["conv1"] == [FROZEN] and groups["fc"] == ["head"] and groups["relu"] == []
    assert main(["plan", config, "--json"]) == 0
    assert shown["groups"] == json.loads(capsys.readouterr().out)["groups"]


def test_the_listed_names_are_exactly_those_the_stage_check_takes(config_file):
    cfg = load_config(str(config_file()), ["model.arch=mobilenet_v2"])
    found = list_modules(cfg)
    built = skeleton(cfg.model, found.classes)
    for name, _ in built.model.named_modules():
        stage = dataclasses.replace(cfg.train, unfreeze=[StageConfig(epoch=1, modules=[name])], unfreeze_epoch=None)
        try:
            check_stages(stage, built.model, built.head_name)
            taken = True
        except FinetuneError:
            taken = False
        assert taken == (name in found.stage_names), name


@pytest.mark.parametrize(
    ("arch", "typo", "close"), [("resnet18", "layer44", "layer4"), ("mobilenet_v2", "features.144", "features.14")]
)
def test_a_mistyped_stage_module_points_to_finetune_modules_and_close_names(config_file, capsys, arch, typo, close):
    config = str(config_file(model={"arch": arch}, train={"unfreeze": [{"epoch": 1, "modules": [typo]}]}))
    for command in ("plan", "train"):
        assert main([command, config]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"did you mean {close}" in err and "`finetune modules <config>`" in err
    assert main(["modules", config]) == 0, "the listing is where to find the fix"
    out = capsys.readouterr().out
    assert "stages are refused" in out and tree(out)[close][2] == "yes"


def test_a_parameterless_stage_module_is_refused_as_the_listing_says(config_file, capsys):
    config = str(config_file(train={"unfreeze": [{"epoch": 1, "modules": ["layer4", "avgpool"]}]}))
    assert main(["plan", config]) == 2
    assert "module 'avgpool' has no parameters to train" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["missing.yaml"], "config file missing.yaml not found"), (["CONFIG", "--depth", "0"], "--depth 0: give 1")],
)
def test_bad_input_is_one_line_and_exit_2(config_file, capsys, args, message):
    args = [str(config_file()) if a == "CONFIG" else a for a in args]
    assert main(["modules", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
