import dataclasses
import json
import re
import time
import types
import typing
from pathlib import Path

import pytest

from finetune.config.check import RANGES
from finetune.config.load import load_config
from finetune.config.schema import Config
from finetune.errors import FinetuneError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_schema():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.data.dataset, cfg.data.train_size, cfg.data.val_size) == ("cifar10", 3000, 800)
    assert (cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.unfreeze_epoch) == (1e-3, 1e-4, None)
    assert (cfg.train.freeze_backbone, cfg.data.num_workers) == (True, "auto")
    assert cfg.checkpoint.monitor == "val_acc"


def test_file_values_and_set_overrides_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["train.epochs=2", "data.train_classes=[0, cat]", "train.lr_head=3e-4"])
    assert cfg.name == "x"
    assert cfg.train.epochs == 2
    assert cfg.data.train_classes == [0, "cat"]
    assert cfg.train.lr_head == pytest.approx(3e-4)


def test_int_is_accepted_for_float_keys(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  weight_decay: 0\n"))
    assert isinstance(cfg.train.weight_decay, float)


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    with pytest.raises(FinetuneError, match=r"unknown key train\.lr_hed \(did you mean train\.lr_head\?\)"):
        load_config(write(tmp_path, "train:\n  lr_hed: 0.1\n"))


def test_unknown_override_key_is_caught_too():
    with pytest.raises(FinetuneError, match=r"data\.batchsize.*data\.batch_size"):
        load_config(None, ["data.batchsize=4"])


@pytest.mark.parametrize(
    ("item", "closest"), [("train.lr_hed=1e-3", "train.lr_head"), ("trian.epochs=2", "train.epochs")]
)
def test_an_unknown_set_key_blames_the_override_not_the_file(tmp_path, item, closest):
    key = item.split("=")[0]
    with pytest.raises(FinetuneError) as caught:
        load_config(write(tmp_path, "train:\n  epochs: 2\n"), [item])
    assert str(caught.value) == f"--set {key}: no such key; did you mean {closest}?"


def test_an_unknown_set_key_with_nothing_close_lists_its_sections_keys():
    with pytest.raises(FinetuneError, match=r"^--set train\.zzzzzzzz: no such key; valid keys: train\.epochs, "):
        load_config(None, ["train.zzzzzzzz=1"])


def test_num_workers_is_auto_or_a_count():
    assert load_config(None, ["data.num_workers=0"]).data.num_workers == 0
    assert load_config(None, ["data.num_workers=auto"]).data.num_workers == "auto"
    with pytest.raises(
        FinetuneError, match=r"data\.num_workers = 'all' is invalid; expected an integer or one of auto"
    ):
        load_config(None, ["data.num_workers=all"])
    with pytest.raises(FinetuneError, match=r"data\.num_workers = -1 must not be negative"):
        load_config(None, ["data.num_workers=-1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(FinetuneError, match=r"train\.epochs = 'three' is invalid; expected an integer"):
        load_config(None, ["train.epochs=three"])


def test_choice_lists_the_valid_values():
    with pytest.raises(FinetuneError, match=r"train\.optimizer .* one of adam, adamw, sgd"):
        load_config(None, ["train.optimizer=lion"])


def test_checkpoint_judge_defaults_to_the_last_stage_and_lists_its_rules():
    assert load_config(None).checkpoint.judge == "last_stage"
    with pytest.raises(FinetuneError) as caught:
        load_config(None, ["checkpoint.judge=max"])
    assert str(caught.value) == "config: checkpoint.judge = 'max' is invalid; expected one of last_stage, best, final"


def test_yaml_syntax_error_gives_the_line(tmp_path):
    with pytest.raises(FinetuneError, match=r"c\.yaml line 2: invalid YAML \(mapping values are not allowed"):
        load_config(write(tmp_path, "name: a\ntrain: epochs: 3\n"))


def test_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(FinetuneError, match="invalid YAML"):
        load_config(write(tmp_path, text))
    assert not marker.exists()


def test_unfreeze_epoch_must_fall_inside_training():
    with pytest.raises(FinetuneError, match=r"train\.unfreeze_epoch = 3 must be between 0 and train\.epochs - 1 = 2"):
        load_config(None, ["train.epochs=3", "train.unfreeze_epoch=3"])


def test_set_without_equals_is_explained():
    with pytest.raises(FinetuneError, match="expected KEY=VALUE"):
        load_config(None, ["train.epochs"])


def number_keys(tp: typing.Any, key: str = "") -> set[str]:
    """Every place the schema holds a number, spelled as RANGES spells it."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        return set().union(*(number_keys(hints[name], f"{key}.{name}" if key else name) for name in names))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(number_keys(a, key) for a in args))
    if origin in (list, dict):
        return number_keys(args[-1], f"{key}[]")
    return {key} if tp in (int, float) else set()


def test_every_number_the_schema_holds_has_a_range_and_every_range_a_key():
    assert number_keys(Config) == set(RANGES)


SCALAR_KEYS = [key for key in RANGES if "[]" not in key]


@pytest.mark.parametrize("key", SCALAR_KEYS)
@pytest.mark.parametrize(("value", "rule"), [(10**40, "must be (at most|in)"), (10**400, ""), (".nan", "")])
def test_every_number_is_refused_when_huge_or_not_finite(key, value, rule):
    with pytest.raises(FinetuneError, match=rf"^config: {re.escape(key)} = .*{rule}"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_learning_rates_must_be_finite(value):
    with pytest.raises(FinetuneError, match=r"train\.lr_backbone = (-?inf|nan) must be a finite number"):
        load_config(None, [f"train.lr_backbone={value}"])


@pytest.mark.parametrize(
    ("key", "value", "limit"),
    [
        ("train.epochs", 10**12, "10000"),
        ("data.train_size", 10**12, "100000000"),
        ("data.image_size", 100_000, "1024"),
        ("data.batch_size", 10**9, "65536"),
        ("train.early_stopping.patience", 10**9, "10000"),
    ],
)
def test_sizes_are_bounded_to_what_a_machine_can_hold(key, value, limit):
    with pytest.raises(FinetuneError, match=rf"{key.replace('.', '[.]')} = {value} must be at most {limit}$"):
        load_config(None, [f"{key}={value}"])


def test_values_inside_lists_and_mappings_are_bounded_too():
    with pytest.raises(FinetuneError, match=r"train\.class_weights\['cat'\] = inf must be a finite number"):
        load_config(None, ["train.class_weights={cat: .inf}"])
    with pytest.raises(FinetuneError, match=r"train\.class_weights\[0\] = 1000.* must be at most 1e\+06"):
        load_config(None, [f"train.class_weights=[{10**400}]"])
    with pytest.raises(FinetuneError, match=r"train\.unfreeze\[0\]\.lr = inf must be a finite number"):
        load_config(None, ["train.unfreeze=[{epoch: 1, modules: [layer4], lr: .inf}]"])
    with pytest.raises(FinetuneError, match=r"train\.unfreeze\[0\]\.epoch = -1 must not be negative"):
        load_config(None, ["train.unfreeze=[{epoch: -1, modules: [layer4]}]"])


def test_an_integer_too_large_for_a_float_is_refused_not_a_traceback():
    with pytest.raises(FinetuneError, match=r"train\.lr_head = 1000.* is too large for a number"):
        load_config(None, [f"train.lr_head={10**400}"])


@pytest.mark.parametrize("where", ["file", "--set"])
def test_deeply_nested_yaml_is_one_line(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(FinetuneError, match="nested too deeply") as caught:
        if where == "file":
            load_config(write(tmp_path, f"name: {deep}\n"))
        else:
            load_config(None, [f"data.train_classes={deep}"])
    assert "\n" not in str(caught.value)


def test_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    started = time.monotonic()
    with pytest.raises(FinetuneError) as caught:
        load_config(write(tmp_path, "\n".join(lines) + "\nname: *a29\n"))
    assert time.monotonic() - started < 5
    assert len(str(caught.value)) < 300


def test_keys_and_values_print_on_one_short_line():
    with pytest.raises(FinetuneError) as caught:
        load_config(None, ["train.bad\nkey=1"])
    assert "\n" not in str(caught.value)
    with pytest.raises(FinetuneError) as caught:
        load_config(None, [f"name=[{', '.join(['x'] * 10_000)}]"])
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("device", ["cpu\n", "cuda:99999", "cuda:\u0661"])
def test_device_must_match_whole_and_in_ascii_digits(device):
    with pytest.raises(FinetuneError, match="device = .* is invalid"):
        load_config(None, [f"device={device!r}"])


@pytest.mark.parametrize("name", ["..", ".", '"a\\tb"', "x" * 300])
def test_name_must_be_a_usable_folder_name(name):
    with pytest.raises(FinetuneError, match="must be a printable folder name"):
        load_config(None, [f"name={name}"])


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("out_dir", '"runs\\0x"', r"out_dir = 'runs\\x00x'"), ("data.root", '"\\ud800"', r"data\.root = '\\ud800'")],
)
def test_paths_the_os_cannot_take_are_refused_before_they_reach_it(key, value, shown):
    with pytest.raises(FinetuneError, match=rf"^config: {shown} holds a NUL or a lone surrogate character"):
        load_config(None, [f"{key}={value}"])


def test_set_inside_an_empty_section_fills_it(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n"), ["train.epochs=5"])
    assert cfg.train.epochs == 5


STAGED = ["train.unfreeze=[{epoch: 1, modules: [layer4]}]"]


def test_null_shorthand_keys_count_as_not_given_next_to_stages():
    """Any shipped config becomes a staged schedule from the command line."""
    nulls = ["train.freeze_backbone=null", "train.unfreeze_epoch=null"]
    cfg = load_config("configs/early_unfreeze.yaml", [*nulls, *STAGED])
    assert [s.modules for s in cfg.train.unfreeze] == [["layer4"]]
    assert "unfreeze_epoch" not in cfg.to_dict()["train"]


def test_plan_turns_a_shipped_shorthand_config_into_stages_from_the_command_line(capsys):
    from finetune.cli import main

    nulls = ["train.freeze_backbone=null", "train.unfreeze_epoch=null"]
    assert main(["plan", "configs/early_unfreeze.yaml", "--set", *nulls, "--set", *STAGED, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["group"], g["trains from epoch"]) for g in groups] == [("head", 1), ("layer4", 2)]


def test_a_non_null_shorthand_key_next_to_stages_is_still_refused():
    with pytest.raises(FinetuneError, match=r"drop train\.freeze_backbone and train\.unfreeze_epoch or set it to null"):
        load_config("configs/early_unfreeze.yaml", STAGED)
    with pytest.raises(FinetuneError, match=r"shorthand train\.freeze_backbone both"):
        load_config("configs/early_unfreeze.yaml", ["train.unfreeze_epoch=null", *STAGED])


def test_without_stages_unfreeze_epoch_null_still_means_never_and_freeze_backbone_null_the_default():
    cfg = load_config("configs/early_unfreeze.yaml", ["train.unfreeze_epoch=null", "train.freeze_backbone=null"])
    assert (cfg.train.unfreeze_epoch, cfg.train.freeze_backbone, cfg.train.unfreeze) == (None, True, None)
