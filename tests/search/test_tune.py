"""`finetune tune`: real Optuna studies on a real journal file and a real PostgreSQL server, real
worker processes (killed with SIGKILL), torchrun with gloo."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_imagefolder, write_config
from processes import Finetune, Torchrun, assert_same_as_reference, csv_rows

from finetune.cli import main
from finetune.config.load import load_config
from finetune.errors import FinetuneError
from finetune.search.tune import StudyInfo, best_trial, connect, open_study

optuna = pytest.importorskip("optuna", reason="needs the tune extra: pip install -e '.[tune]'")

GOOD = "train.lr_head: {low: 2.0e-3, high: 4.0e-3}\ntrain.lr_backbone: {low: 1.0e-4, high: 1.0e-3, log: true}\n"
BAD = "train.lr_head: {low: 1.0e-10, high: 2.0e-10}\ntrain.lr_backbone: {low: 1.0e-10, high: 2.0e-10, log: true}\n"


@pytest.fixture
def study(tmp_path: Path):
    """A tiny config (2 epochs, unfreeze after 1) and a space file of the given text."""
    data = make_imagefolder(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", train={"epochs": 2})

    def space(text: str = GOOD, name: str = "space.yaml") -> tuple[Path, Path]:
        (tmp_path / name).write_text(text)
        return config, tmp_path / name

    return space


def load(study_dir: Path, name: str = "tiny") -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def trial_lines(printed: str) -> list[str]:
    """The trials a worker trained: each announces its run dir once when it starts."""
    return [line.split(":")[0] for line in printed.splitlines() if "run dir" in line and "trial-" in line]


def test_a_study_writes_trial_run_dirs_best_yaml_and_plots_and_continues(study, tmp_path, capsys):
    config, space = study()
    out = tmp_path / "study"
    args = ["tune", str(config), "--space", str(space), "--trials", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| trial-0000" in printed and "importances:" in printed
    assert states(load(out)) == ["COMPLETE"] * 2
    for n in range(2):
        run = out / f"trial-{n:04d}"
        assert sorted(os.listdir(run)) == ["best.pt", "config.yaml", "results.csv", "summary.json"], "no last.pt"
    best = load_config(out / "best.yaml")  # ready for finetune train: the config's own name
    assert best.name == "tiny"
    assert best.train.lr_backbone == load(out).best_params["train.lr_backbone"]
    for name in ("importances.json", "optimization_history.png", "parallel_coordinate.png", "slice.png"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "comparison" / "comparison.csv")) == 2

    assert main([*args[:-4], "--trials", "3", "--out", str(out)]) == 0  # the same study, one more trial
    assert states(load(out)) == ["COMPLETE"] * 3
    assert trial_lines(capsys.readouterr().out) == ["trial-0002"]
    assert main(["compare", str(out)]) == 0  # the study's report, any time
    assert "| trial-0002" in capsys.readouterr().out

    again = tmp_path / "again"  # same seed, one worker: the same trials
    assert main([*args[:-1], str(again)]) == 0
    assert [t.params for t in load(again).trials] == [t.params for t in load(out).trials[:2]]


def test_trials_are_judged_by_the_epochs_in_which_every_stage_trains_not_the_head_epoch_they_share(
    study, tmp_path, capsys
):
    """The space changes only the backbone's LR, so the head-only epoch 1 is the same in every
    trial, and here their best (the LRs are too high): judged by it, every trial would tie."""
    config, space = study("train.lr_backbone: {low: 1.0e-2, high: 1.0e-1, log: true}\n")
    out = tmp_path / "study"
    args = ["tune", str(config), "--space", str(space), "--trials", "2", "--out", str(out)]
    assert main([*args, "--set", "checkpoint.monitor=val_loss"]) == 0
    assert "judged by: val_loss over the epochs where every stage trains (checkpoint.judge: last_stage)" in (
        capsys.readouterr().out
    )
    trials = load(out).trials
    for trial in trials:
        results = pd.read_csv(out / f"trial-{trial.number:04d}" / "results.csv")
        head, backbone = (results.loc[results["stage"] == s, "val_loss"] for s in ("head", "backbone"))
        assert head.min() < backbone.min(), "the trap: the shared head epoch is every trial's best"
        assert trial.value == pytest.approx(backbone.min(), rel=1e-5)
        assert trial.user_attrs["final"] == pytest.approx(results["val_loss"].iloc[-1], rel=1e-5)
    assert len({t.value for t in trials}) == 2, "no tie on the head epoch"
    best = min(trials, key=lambda t: t.value)
    assert load_config(out / "best.yaml").train.lr_backbone == best.params["train.lr_backbone"]


@pytest.mark.parametrize(
    ("direction", "judged"),
    [("maximize", [(0.6, 0.3), (0.6, 0.5), (0.4, 0.9)]), ("minimize", [(0.4, 0.5), (0.4, 0.3), (0.6, 0.1)])],
)
def test_the_best_trial_is_the_best_judged_and_of_equal_ones_the_best_final(direction, judged):
    study = optuna.create_study(direction=direction)
    for value, final in judged:
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"final": final}))
    assert best_trial(study).number == 1


def test_a_study_keeps_the_rule_its_trials_were_judged_by(tmp_path):
    info = StudyInfo("s", None, "tiny", "val_acc", 2, 0, "median", judge="last_stage")
    open_study(tmp_path, info).add_trial(optuna.trial.create_trial(value=0.5))
    with pytest.raises(FinetuneError, match="^tune: study s judged its trials by checkpoint.judge last_stage, this"):
        open_study(tmp_path, dataclasses.replace(info, judge="final"))
    assert open_study(tmp_path, info).user_attrs["judge"] == "last_stage"
    old = tmp_path / "old"  # a study from before the rule: its trials were told their best epoch
    connect(old, None, "s", "maximize").add_trial(optuna.trial.create_trial(value=0.5))
    with pytest.raises(FinetuneError, match="checkpoint.judge best, this config by last_stage; set checkpoint.judge"):
        open_study(old, info)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "train.lr_backbon: {low: 1.0e-5, high: 1.0e-3}",
            "unknown key train.lr_backbon (did you mean train.lr_backbone?)",
        ),
        ("train.lr_backbone: {low: 1.0e-3, high: 1.0e-5}", "train.lr_backbone: low 0.001 must be below high 1e-05"),
        ("train.lr_backbone: {low: 0, high: 1.0e-3, log: true}", "a log range needs low > 0"),
        ("train.lr_backbone: {low: 1.0e-5, hi: 1.0e-3}", "train.lr_backbone has keys low, hi; expected"),
        ("train.scheduler.name: {choices: [cosine, cosinus]}", "train.scheduler.name = 'cosinus' is refused"),
        ("train.unfreeze_epoch: {low: 0, high: 4}", "train.unfreeze_epoch = 4 is refused"),
        ("checkpoint.judge: {choices: [best, final]}", "searches checkpoint.judge, which says how trials compare"),
    ],
)
def test_a_bad_space_is_one_line_and_exit_2_before_anything_trains(study, tmp_path, capsys, space, message):
    config, space_file = study(space)
    out = tmp_path / "study"
    assert main(["tune", str(config), "--space", str(space_file), "--trials", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message is None or message in err, err
    assert not glob.glob(str(out / "trial-*")), "nothing trained, no trial dir left"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--trials", "0"], "tune: --trials 0: give the study's total number of trials, at least 1"),
        (["--storage", "study.db"], "tune: --storage study.db: expected an RDB URL"),
        (["--storage", "postgresql://tune@127.0.0.1:1/none"], "--storage postgresql://tune@127.0.0.1:1/none cannot be"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(study, tmp_path, capsys, option, message):
    config, space = study()
    args = ["tune", str(config), "--space", str(space), "--trials", "2", "--out", str(tmp_path / "study"), *option]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not glob.glob(str(tmp_path / "study" / "trial-*"))


def test_a_sampled_combination_the_config_refuses_fails_its_trial_before_it_trains(study, tmp_path, capsys):
    """Each value alone passes (the config never unfreezes; it has 2 epochs), together they do not."""
    config, space = study("train.epochs: {choices: [1]}\ntrain.unfreeze_epoch: {choices: [1]}\n")
    out = tmp_path / "study"
    args = ["tune", str(config), "--space", str(space), "--trials", "2", "--out", str(out)]
    assert main([*args, "--set", "train.unfreeze_epoch=null"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tune: trial-0000: ") and err.count("\n") == 1, err
    assert "train.unfreeze_epoch" in err
    assert states(load(out)) == ["FAIL"]
    assert not (out / "trial-0000").exists()


def test_a_trial_that_diverges_fails_and_the_study_goes_on(study, tmp_path, capsys):
    """A loss that turns non-finite ends that trial (FAIL), not the study: a rerun would only
    diverge again on the same values."""
    config, space = study("train.lr_backbone: {choices: [1.0e+30, 1.0e-4]}\n")
    out = tmp_path / "study"
    sets = ["train.optimizer=sgd", "train.feature_cache=off"]
    assert main(["tune", str(config), "--space", str(space), "--trials", "3", "--out", str(out), "--set", *sets]) == 0
    assert "failed: loss became" in capsys.readouterr().out
    found = states(load(out))
    assert "FAIL" in found and found.count("COMPLETE") == 3, "a failed trial does not count towards --trials"


def test_two_workers_on_one_journal_file_train_every_trial_once(study, tmp_path):
    config, space = study()
    out = tmp_path / "study"
    args = ["tune", config, "--space", space, "--trials", "4", "--out", out]
    workers = [Finetune(*args), Finetune(*args)]
    printed = [w.finish() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], printed
    trained = trial_lines(printed[0][0]) + trial_lines(printed[1][0])
    assert sorted(trained) == [f"trial-{n:04d}" for n in range(4)], "each trial trained once, by one worker"
    assert all(trial_lines(p[0]) for p in printed), "both workers trained"
    assert states(load(out)).count("COMPLETE") == 4
    assert (out / "best.yaml").is_file(), "the worker that finished the last trial wrote the report"


def test_a_worker_killed_mid_trial_leaves_it_to_be_resumed_exactly(tmp_path):
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train={"epochs": 2})
    space = tmp_path / "space.yaml"
    space.write_text(GOOD)
    args = ["tune", config, "--space", space, "--trials", "1", "--set", "checkpoint.keep=all", "--out"]  # last.pt
    reference = tmp_path / "reference"
    assert main([*map(str, args), str(reference)]) == 0

    out = tmp_path / "study"
    run = out / "trial-0000"
    worker = Finetune(*args, out)
    assert worker.wait_for(lambda: worker.bar_at("epoch 2", steps=2)), worker.finish()
    worker.send_signal(signal.SIGKILL)
    worker.finish()
    assert csv_rows(run) == 1, "killed inside epoch 2"
    assert states(load(out)) == ["RUNNING"], "the dead worker's trial stays RUNNING"

    again = Finetune(*args, out)
    printed, err = again.finish()
    assert again.returncode == 0, err
    assert f"resuming {run} after epoch 1" in printed
    assert states(load(out)) == ["COMPLETE"], "told under its own trial id: no second trial"
    assert load(out).trials[0].params == load(reference).trials[0].params
    assert_same_as_reference(run, reference / "trial-0000")
    assert load(out).best_value == load(reference).best_value


def test_trials_clearly_worse_than_the_median_are_pruned_after_the_last_stage_starts(study, tmp_path, capsys):
    config, good = study()
    _, bad = study(BAD, "bad.yaml")
    out = tmp_path / "study"
    common = ["tune", str(config), "--out", str(out), "--set", "train.epochs=4", "train.unfreeze_epoch=1"]
    assert main([*common, "--space", str(good), "--trials", "2"]) == 0  # the median's baseline
    capsys.readouterr()
    assert main([*common, "--space", str(bad), "--trials", "3"]) == 0
    printed = capsys.readouterr().out
    assert states(load(out)) == ["COMPLETE", "COMPLETE", "PRUNED"]
    run = out / "trial-0002"
    pruned = json.loads((run / "summary.json").read_text())["pruned"]
    assert pruned["epoch"] == 2, "the first epoch of the last stage (backbone from epoch 2), never the head's"
    assert pruned["reason"].startswith("median pruner: val_acc")
    assert csv_rows(run) == 2 and f"pruned after epoch 2: {pruned['reason']}" in printed
    assert "| 2/4 (pruned)" in printed
    assert sorted(os.listdir(run)) == ["best.pt", "config.yaml", "results.csv", "summary.json"], "no last.pt"
    assert main(["train", "--resume", str(run)]) == 0
    assert f"{run} is complete: pruned at epoch 2" in capsys.readouterr().out


def test_a_torchrun_trial_is_pruned_on_both_ranks_at_the_same_epoch(study, tmp_path):
    config, good = study()
    _, bad = study(BAD, "bad.yaml")
    out = tmp_path / "study"
    common = ["tune", config, "--out", out, "--set", "train.epochs=4"]
    assert main([*map(str, common), "--space", str(good), "--trials", "2"]) == 0
    proc = Torchrun(tmp_path / "logs", *common, "--space", bad, "--trials", "3")
    printed = proc.finish()
    assert proc.returncode == 0, printed + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    assert states(load(out)) == ["COMPLETE", "COMPLETE", "PRUNED"]
    summary = json.loads((out / "trial-0002" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["pruned"]["epoch"] == 2
    log = proc.rank_log(0, "stdout")
    # both ranks join the weight check after each epoch: a rank that trained on would hang it
    assert log.count("weights identical on 2 ranks") == 2 and "pruned after epoch 2" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server of Debian's package on a loopback port in a temp dir; its URL."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    bin_dir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    user = "postgres" if os.geteuid() == 0 else None  # postgres refuses to run as root
    if user:
        shutil.chown(root, pwd.getpwnam(user).pw_uid)
    as_user = ["runuser", "-u", user, "--"] if user else []
    port = _free_port()
    subprocess.run([*as_user, bin_dir / "initdb", "-D", root / "data", "-U", "tune", "--auth=trust"], check=True,
                   capture_output=True)  # fmt: skip
    options = f"-h 127.0.0.1 -p {port} -k {root}"
    start = [*as_user, bin_dir / "pg_ctl", "-D", root / "data", "-o", options, "-l", root / "log", "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql://tune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bin_dir / "pg_ctl", "-D", root / "data", "-m", "fast", "-w", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_study_on_a_postgresql_server(study, tmp_path, postgres):
    config, space = study()
    out = tmp_path / "study"
    args = ["tune", config, "--space", space, "--trials", "3", "--out", out, "--storage", postgres]
    workers = [Finetune(*args), Finetune(*args)]
    printed = [w.finish() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], printed
    trained = trial_lines(printed[0][0]) + trial_lines(printed[1][0])
    assert sorted(trained) == ["trial-0000", "trial-0001", "trial-0002"]
    shared = optuna.load_study(study_name="tiny", storage=postgres)
    assert states(shared).count("COMPLETE") == 3
    assert not (out / "study.journal").exists()
    assert yaml.safe_load((out / "tune.json").read_text())["storage"] == postgres


def test_sweep_with_storage_deals_each_grid_point_to_one_worker_across_machines(study, tmp_path):
    """Two workers with their own dirs (machines sharing no filesystem) and one database."""
    config, _ = study()
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    grid = ["--grid", "train.lr_backbone=1e-4,2e-4,3e-4,4e-4"]
    outs = [tmp_path / "a" / "sweep", tmp_path / "b" / "sweep"]
    workers = [Finetune("sweep", config, *grid, "--out", out, "--storage", url) for out in outs]
    printed = [w.finish() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], printed
    trained = sorted(p.parent.name for out in outs for p in out.glob("*/summary.json"))
    assert trained == [f"lr_backbone={v}e-4" for v in range(1, 5)], "every grid point trained once"
    shared = optuna.load_study(study_name="sweep-sweep", storage=url)
    assert sorted(t.user_attrs["run"] for t in shared.trials if t.state.name == "COMPLETE") == trained
