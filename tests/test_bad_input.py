"""The bad-input catalogue: each case exits 2 with one line naming the culprit and the fix,
no traceback, and leaves the files of an existing run exactly as they were."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_imagefolder, write_config

from finetune.cli import main


@dataclass
class Env:
    tmp: Path
    data: Path
    runs: Path
    existing: Path

    def config(self, **sections) -> str:
        return str(write_config(self.tmp / "config.yaml", self.data, self.runs, **sections))

    def text_config(self, text: str) -> str:
        path = self.tmp / "raw.yaml"
        path.write_text(text)
        return str(path)

    def data_copy(self) -> Path:
        copy = self.tmp / "data_copy"
        shutil.copytree(self.data, copy)
        return copy

    def run_copy(self) -> Path:
        copy = self.tmp / "run_copy"
        shutil.copytree(self.existing, copy)
        return copy


class Exploit:
    """Pickling this makes torch.load without weights_only run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("existing")
    data = make_imagefolder(root / "data")
    config = write_config(root / "config.yaml", data, root / "runs", train={"epochs": 2})
    assert main(["train", str(config)]) == 0
    return data, root / "runs" / "tiny"


@pytest.fixture
def env(tmp_path, existing_run) -> Env:
    data, existing = existing_run
    return Env(tmp_path, data, existing.parent, existing)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_empty_class(env: Env) -> list[str]:
    root = env.data_copy()
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    return ["train", env.config(), "--set", f"data.root={root}"]


def make_no_class_folders(env: Env) -> list[str]:
    root = env.tmp / "flat"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "train" / "img.png").write_bytes(b"")
    return ["train", env.config(), "--set", f"data.root={root}"]


def make_class_mismatch(env: Env) -> list[str]:
    root = env.data_copy()
    (root / "val" / "frog").rename(root / "val" / "toad")
    return ["train", env.config(), "--set", f"data.root={root}"]


def make_all_corrupt_class(env: Env) -> list[str]:
    root = env.data_copy()
    for f in (root / "train" / "frog").iterdir():
        f.write_bytes(b"broken")
    return ["train", env.config(), "--set", f"data.root={root}"]


def make_no_split_folders(env: Env) -> list[str]:
    (env.tmp / "only_images").mkdir()
    return ["train", env.config(), "--set", f"data.root={env.tmp / 'only_images'}"]


def make_wrong_arch_weights(env: Env) -> list[str]:
    path = env.tmp / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return ["train", env.config(), "--set", f"model.weights={path}"]


def make_truncated_weights(env: Env) -> list[str]:
    path = env.tmp / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100_000])
    return ["train", env.config(), "--set", f"model.weights={path}"]


def make_pickle_weights(env: Env) -> list[str]:
    path = env.tmp / "evil.pth"
    torch.save({"model": Exploit(env.tmp / "pwned")}, path)
    return ["train", env.config(), "--set", f"model.weights={path}"]


def make_unwritable_run_dir(env: Env) -> list[str]:
    blocker = env.tmp / "a_file"
    blocker.write_text("not a folder")
    return ["train", env.config(), "--run-dir", str(blocker / "run")]


def make_resume_no_run(env: Env) -> list[str]:
    (env.tmp / "empty").mkdir()
    return ["train", "--resume", str(env.tmp / "empty")]


def make_resume_corrupt(env: Env) -> list[str]:
    run = env.run_copy()
    (run / "last.pt").write_bytes(b"\x00" * 64)
    return ["train", "--resume", str(run)]


def make_resume_pickle(env: Env) -> list[str]:
    run = env.run_copy()
    torch.save({"model": {}, "progress": Exploit(env.tmp / "pwned")}, run / "last.pt")
    return ["train", "--resume", str(run)]


def make_resume_changed(env: Env) -> list[str]:
    return ["train", "--resume", str(env.run_copy()), "--set", "train.lr_head=0.5", "data.batch_size=2"]


def make_resume_fewer_epochs(env: Env) -> list[str]:
    """A 3-epoch run stopped after epoch 2, resumed with 2 epochs: a config that is valid and
    differs only in train.epochs, so the epochs-only-upward rule is what refuses it."""
    run = env.run_copy()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 2", "epochs: 3", 1))
    return ["train", "--resume", str(run), "--set", "train.epochs=2"]


def staged(env: Env, command: str, stages: str) -> list[str]:
    """`command` on the tiny config with stages: its shorthand (unfreeze_epoch: 1) set to null."""
    return [command, env.config(), "--set", "train.unfreeze_epoch=null", f"train.unfreeze={stages}"]


def make_run_without_best(env: Env) -> Path:
    """A run stopped before its first epoch ended: last.pt, no best.pt."""
    run = env.run_copy()
    (run / "best.pt").unlink()
    return run


CASES = {
    "yaml syntax": (lambda e: ["train", e.text_config("name: a\ndata: root: x\n")], r"raw\.yaml line 2: invalid YAML"),
    "yaml python tag": (
        lambda e: ["train", e.text_config("name: !!python/object/apply:os.getcwd []\n")],
        r"raw\.yaml line 1: invalid YAML",
    ),
    "yaml not a mapping": (lambda e: ["train", e.text_config("- a\n- b\n")], r"top level must be a mapping"),
    "config missing": (lambda e: ["train", str(e.tmp / "nope.yaml")], r"config file .*nope\.yaml not found"),
    "no config": (lambda e: ["train"], r"give a CONFIG file, or --resume RUN_DIR"),
    "unknown key": (
        lambda e: ["train", e.config(), "--set", "trian.epochs=2"],
        r"--set trian\.epochs: no such key; did you mean train\.epochs\?",
    ),
    "unknown nested key": (
        lambda e: ["train", e.config(), "--set", "train.lr_hed=1e-3"],
        r"--set train\.lr_hed: no such key; did you mean train\.lr_head\?",
    ),
    "resume unknown set key": (
        lambda e: ["train", "--resume", str(e.run_copy()), "--set", "train.epoch=3"],
        r"--set train\.epoch: no such key; did you mean train\.epochs\?",
    ),
    "sweep unknown grid key": (
        lambda e: ["sweep", e.config(), "--grid", "train.lr_hed=1e-3,1e-4"],
        r"--grid train\.lr_hed: no such key; did you mean train\.lr_head\?",
    ),
    "eval unknown set key": (
        lambda e: ["eval", str(e.existing / "best.pt"), "--set", "data.rot=x"],
        r"--set data\.rot: no such key; did you mean data\.root\?",
    ),
    "wrong type": (lambda e: ["train", e.config(), "--set", "train.epochs=two"], r"train\.epochs = 'two'.*integer"),
    "wrong bool": (lambda e: ["train", e.config(), "--set", "data.hflip=maybe"], r"data\.hflip .* true or false"),
    "bad choice": (lambda e: ["train", e.config(), "--set", "train.optimizer=lion"], r"one of adam, adamw, sgd"),
    "subset choice": (lambda e: ["train", e.config(), "--set", "data.subset=odd"], r"data\.subset .*stratified"),
    "negative lr": (lambda e: ["train", e.config(), "--set", "train.lr_head=-0.1"], r"train\.lr_head = -0\.1 must be"),
    "zero backbone lr": (lambda e: ["train", e.config(), "--set", "train.lr_backbone=0"], r"train\.lr_backbone"),
    "zero epochs": (lambda e: ["train", e.config(), "--set", "train.epochs=0"], r"train\.epochs = 0 must be greater"),
    "zero batch": (lambda e: ["train", e.config(), "--set", "data.batch_size=0"], r"data\.batch_size = 0"),
    "negative decay": (lambda e: ["train", e.config(), "--set", "train.weight_decay=-1"], r"weight_decay.*negative"),
    "smoothing": (lambda e: ["train", e.config(), "--set", "train.label_smoothing=1.5"], r"label_smoothing"),
    "unfreeze too late": (
        lambda e: ["train", e.config(), "--set", "train.epochs=2", "train.unfreeze_epoch=2"],
        r"train\.unfreeze_epoch = 2 must be between 0 and train\.epochs - 1 = 1",
    ),
    "set without =": (lambda e: ["train", e.config(), "--set", "train.epochs"], r"--set 'train\.epochs': .*KEY=VALUE"),
    "monitor": (lambda e: ["train", e.config(), "--set", "checkpoint.monitor=f1"], r"checkpoint\.monitor .*val_acc"),
    "device": (lambda e: ["train", e.config(), "--set", "device=tpu"], r"device = 'tpu' is invalid"),
    "fp16 on cpu": (lambda e: ["train", e.config(), "--set", "precision=fp16"], r"fp16 is not supported on CPU"),
    "class weights length": (
        lambda e: ["train", e.config(), "--set", "train.class_weights=[1, 2]"],
        r"class_weights has 2 values but the dataset has 3 classes",
    ),
    "class weights unknown class": (
        lambda e: ["train", e.config(), "--set", "train.class_weights={cow: 2}"],
        r"train\.class_weights: 'cow' is not a class",
    ),
    "train class missing": (
        lambda e: ["train", e.config(), "--set", "data.train_classes=[cat, cow]"],
        r"data\.train_classes: 'cow' is not a class",
    ),
    "root missing": (
        lambda e: ["train", e.config(), "--set", f"data.root={e.tmp / 'missing'}"],
        r"data\.root=.*missing does not exist",
    ),
    "no train/val folders": (make_no_split_folders, r"must hold train/ and val/"),
    "no class folders": (make_no_class_folders, r"holds no class folders"),
    "empty class folder": (make_empty_class, r"class folder .*dog holds no images"),
    "class sets differ": (make_class_mismatch, r"different class folders \(frog, toad\)"),
    "class all corrupt": (make_all_corrupt_class, r"no readable images left for class\(es\) frog"),
    "cifar offline": (
        lambda e: ["train", e.config(), "--set", "data.dataset=cifar10", f"data.root={e.tmp}", "data.download=false"],
        r"CIFAR-10 is not in data\.root=",
    ),
    "unknown arch": (lambda e: ["train", e.config(), "--set", "model.arch=resnet19"], r"did you mean resnet18"),
    "unknown weights name": (
        lambda e: ["train", e.config(), "--set", "model.weights=IMAGENET_X"],
        r"'IMAGENET_X' is not a weights name for resnet18",
    ),
    "weights file missing": (
        lambda e: ["train", e.config(), "--set", f"model.weights={e.tmp / 'w.pth'}"],
        r"model\.weights: file .*w\.pth not found",
    ),
    "weights for another arch": (make_wrong_arch_weights, r"mobilenet\.pth does not fit arch resnet18"),
    "weights truncated": (make_truncated_weights, r"resnet18\.pth is not a loadable state_dict"),
    "weights pickle exploit": (make_pickle_weights, r"evil\.pth is not a loadable state_dict"),
    "run dir not writable": (make_unwritable_run_dir, r"run dir .*a_file/run"),
    "run dir taken": (lambda e: ["train", e.config(), "--run-dir", str(e.existing)], r"already holds a run"),
    "resume without run": (make_resume_no_run, r"no config\.yaml there"),
    "resume corrupt checkpoint": (make_resume_corrupt, r"last\.pt is corrupt"),
    "resume pickle exploit": (make_resume_pickle, r"last\.pt is corrupt or not a plain-tensor checkpoint"),
    "resume changed config": (make_resume_changed, r"differs .* in data\.batch_size, train\.lr_head"),
    "resume fewer epochs": (make_resume_fewer_epochs, r"train\.epochs may only be raised \(run has 3\)"),
    "resume with run dir": (
        lambda e: ["train", "--resume", str(e.run_copy()), "--run-dir", str(e.tmp / "x")],
        r"drop --run-dir",
    ),
    "negative seed": (lambda e: ["train", e.config(), "--set", "seed=-1"], r"seed = -1 must not be negative"),
    "no train classes": (lambda e: ["train", e.config(), "--set", "data.train_classes=[]"], r"train_classes = \[\]"),
    "negative weight in mapping": (
        lambda e: ["train", e.config(), "--set", "train.class_weights={cat: -1}"],
        r"train\.class_weights\['cat'\] = -1 must not be negative",
    ),
    "nan weight in mapping": (
        lambda e: ["train", e.config(), "--set", "train.class_weights={cat: .nan}"],
        r"train\.class_weights\['cat'\] = nan must be a finite number",
    ),
    "stage and shorthand": (
        lambda e: [
            "train",
            e.config(),
            "--set",
            "train.unfreeze=[{epoch: 1, modules: [layer4]}]",
            "train.unfreeze_epoch=1",
        ],
        r"drop train\.unfreeze_epoch",
    ),
    "stage unknown module": (
        lambda e: staged(e, "train", "[{epoch: 1, modules: [layer44]}]"),
        r"names no module 'layer44' of the model; did you mean layer4",
    ),
    "stage at last epoch": (
        lambda e: staged(e, "train", "[{epoch: 3, modules: [layer4]}]"),
        r"train\.unfreeze\[0\]\.epoch = 3 must be between 0 and train\.epochs - 1 = 2",
    ),
    "stage holds head": (
        lambda e: staged(e, "plan", "[{epoch: 1, modules: [fc]}]"),
        r"holds the head 'fc'",
    ),
    "scheduler name": (
        lambda e: ["plan", e.config(), "--set", "train.scheduler.name=cosin"],
        r"train\.scheduler\.name = 'cosin' is invalid; expected one of constant, cosine",
    ),
    "warmup too long": (
        lambda e: ["train", e.config(), "--set", "train.scheduler.warmup_epochs=3"],
        r"train\.scheduler\.warmup_epochs = 3\.0 must be in \[0, epochs\)",
    ),
    "patience zero": (
        lambda e: ["train", e.config(), "--set", "train.early_stopping.patience=0"],
        r"train\.early_stopping\.patience = 0 must be >= 1",
    ),
    "infinite lr": (
        lambda e: ["train", e.config(), "--set", "train.lr_backbone=.inf"],
        r"train\.lr_backbone = inf must be a finite number",
    ),
    "astronomical epochs": (
        lambda e: ["plan", e.config(), "--set", f"train.epochs={10**30}"],
        r"train\.epochs = 10{30} must be at most 10000",
    ),
    "huge train size": (
        lambda e: ["train", e.config(), "--set", f"data.train_size={10**12}"],
        r"data\.train_size = 10{12} must be at most 100000000",
    ),
    "yaml nested too deeply": (
        lambda e: ["plan", e.text_config("name: " + "[" * 100_000 + "]" * 100_000 + "\n")],
        r"raw\.yaml: YAML nested too deeply",
    ),
    "lr-find unknown stage": (
        lambda e: ["lr-find", e.config(), "--stage", "layer9"],
        r"lr-find --stage 'layer9': the config's stages are head, backbone",
    ),
    "lr-find too few steps": (lambda e: ["lr-find", e.config(), "--steps", "2"], r"--steps 2: give 5 to 1000"),
    "lr-find lrs reversed": (
        lambda e: ["lr-find", e.config(), "--start-lr", "1", "--end-lr", "0.1"],
        r"need 0 < start < end",
    ),
    "eval run dir without best.pt": (
        lambda e: ["eval", str(make_run_without_best(e))],
        r"run_copy has no best\.pt; it holds last\.pt: give .*run_copy/last\.pt",
    ),
    "predict run dir without best.pt": (
        lambda e: ["predict", str(make_run_without_best(e)), str(e.data / "val")],
        r"run_copy has no best\.pt; it holds last\.pt: give .*run_copy/last\.pt",
    ),
    "export dir holding no checkpoint": (
        lambda e: ["export", str(e.data)],
        r"data has no best\.pt and holds no checkpoint; give a checkpoint file or a run dir",
    ),
    "negative memory budget": (
        lambda e: ["train", e.config(), "--set", "data.memory_budget_mb=-1"],
        r"data\.memory_budget_mb = -1 must not be negative",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case, env, capsys):
    make_args, pattern = CASES[case]
    args = make_args(env)
    before = snapshot(env.runs)
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert __import__("re").search(pattern, errors[0]), errors[0]
    assert snapshot(env.runs) == before
    assert not (env.tmp / "pwned").exists(), "a pickled command ran on load"


def test_nan_loss_stops_with_epoch_and_step_and_keeps_best(env, capsys):
    """A backbone LR of 1e30 blows up on the first unfrozen step; epoch 1's best.pt stays."""
    run = env.tmp / "nan"
    overrides = ["train.optimizer=sgd", "train.lr_backbone=1e30", "train.epochs=2", "train.feature_cache=off"]
    code = main(["train", env.config(), "--run-dir", str(run), "--set", *overrides])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert __import__("re").search(r"loss became (nan|inf) at epoch 2, step \d+", error), error
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_weights_that_turn_non_finite_on_an_epochs_last_step_are_never_saved(env, capsys):
    """One step per epoch at a huge head LR: that step's loss is finite, the weights after it
    are not. Validation sees it, and no checkpoint is written."""
    run = env.tmp / "nan_weights"
    sets = ["train.optimizer=sgd", "train.lr_head=1e38", "train.unfreeze_epoch=null", "data.batch_size=64"]
    assert main(["train", env.config(), "--run-dir", str(run), "--set", *sets]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the model became non-finite in epoch 1" in error, error
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
