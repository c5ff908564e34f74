from pathlib import Path

import pytest

from finetune.config import Config, load_config
from finetune.errors import FinetuneError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_schema():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.data.dataset, cfg.data.train_size, cfg.data.val_size) == ("cifar10", 3000, 800)
    assert (cfg.train.lr_head, cfg.train.lr_backbone, cfg.train.unfreeze_epoch) == (1e-3, 1e-4, 1)
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


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(FinetuneError, match=r"train\.epochs = 'three' is invalid; expected an integer"):
        load_config(None, ["train.epochs=three"])


def test_choice_lists_the_valid_values():
    with pytest.raises(FinetuneError, match=r"train\.optimizer .* one of adam, adamw, sgd"):
        load_config(None, ["train.optimizer=lion"])


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
