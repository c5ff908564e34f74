"""`finetune sweep`: grids, seeds, config lists, resume of an interrupted sweep, errors."""

from __future__ import annotations

import signal

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config
from processes import Finetune, assert_same_as_reference, csv_rows

from finetune.cli import main
from finetune.config.load import load_config
from finetune.data.sources import load_data
from finetune.errors import FinetuneError
from finetune.runs.compare import pareto_front, plot_tradeoff
from finetune.runs.results import TIMING
from finetune.search.sweep import expand, parse_grid


def results(run) -> pd.DataFrame:
    return pd.read_csv(run / "results.csv").drop(columns=list(TIMING))


def test_grid_over_seeds_writes_each_run_as_train_would_and_aggregates_seeds(config_file, tmp_path, capsys):
    config = str(config_file(train={"epochs": 2}))
    out = tmp_path / "sweep"
    args = ["sweep", config, "--grid", "train.lr_backbone=1e-4,1e-5", "--seeds", "0,1", "--out", str(out)]
    assert main(args) == 0
    names = ["lr_backbone=1e-4,seed=0", "lr_backbone=1e-4,seed=1", "lr_backbone=1e-5,seed=0", "lr_backbone=1e-5,seed=1"]
    assert sorted(p.name for p in out.iterdir() if (p / "config.yaml").exists()) == names
    single = tmp_path / "single"
    sets = ["train.lr_backbone=1e-5", "seed=1", f"out_dir={out}", "name=lr_backbone=1e-5,seed=1"]
    assert main(["train", config, "--run-dir", str(single), "--set", *sets]) == 0
    pd.testing.assert_frame_equal(results(single), results(out / "lr_backbone=1e-5,seed=1"))
    seeds = pd.read_csv(out / "comparison" / "seeds.csv")
    assert seeds["setting"].tolist() == ["lr_backbone=0.0001", "lr_backbone=1e-05"]
    assert seeds["runs"].tolist() == [2, 2]
    table = pd.read_csv(out / "comparison" / "comparison.csv").set_index("run")
    mean = table.loc[["lr_backbone=1e-4,seed=0", "lr_backbone=1e-4,seed=1"], "best_val_acc"].mean()
    assert seeds["best_val_acc"].iloc[0] == pytest.approx(mean)
    assert (out / "comparison" / "tradeoff.png").stat().st_size > 10_000
    assert main(args) == 0, "a rerun of a finished sweep trains nothing"
    assert capsys.readouterr().out.count("finished before, skipped") == 4


def test_a_list_of_configs_is_one_sweep_with_shared_sets(config_file, tmp_path):
    a = config_file(train={"epochs": 1, "unfreeze_epoch": None})
    b = write_config(
        tmp_path / "b.yaml", tmp_path / "data", tmp_path / "runs", train={"epochs": 1, "unfreeze_epoch": 0}
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(a), str(b), "--set", "data.batch_size=4", "--out", str(out)]) == 0
    for name in ("config", "b"):
        assert load_config(out / name / "config.yaml").data.batch_size == 4
    assert pd.read_csv(out / "b" / "results.csv")["stage"].tolist() == ["backbone"]


def test_seeds_vary_training_but_every_run_is_scored_on_the_same_images(imagefolder):
    sets = [f"data.root={imagefolder}", "data.dataset=imagefolder", "data.train_size=12", "data.val_size=6"]
    a, b = (load_data(load_config(None, [*sets, f"seed={s}"]).data) for s in (1, 2))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.images, b.train.images)
    c = load_data(load_config(None, [*sets, "data.split_seed=7"]).data)
    assert not torch.equal(a.val.images, c.val.images)


def test_a_user_error_in_a_later_run_stops_the_sweep_and_keeps_finished_runs(config_file, tmp_path, capsys):
    config = str(config_file(train={"epochs": 1, "unfreeze_epoch": None}))
    out = tmp_path / "sweep"
    missing = tmp_path / "nowhere"
    assert main(["sweep", config, "--grid", f"data.root={tmp_path / 'data'},{missing}", "--out", str(out)]) == 2
    assert "data.root=" in capsys.readouterr().err
    finished = [p for p in out.iterdir() if (p / "results.csv").exists()]
    assert len(finished) == 1


def test_bad_grid_and_seeds_are_one_line(config_file, capsys):
    config = str(config_file())
    assert main(["sweep", config, "--grid", "train.lr_backbone"]) == 2
    assert "expected KEY=V1,V2" in capsys.readouterr().err
    assert main(["sweep", config, "--seeds", "a,b"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["sweep", config, "--grid", "train.optimizer=adam,lion"]) == 2
    assert "one of adam, adamw, sgd" in capsys.readouterr().err


def test_grid_values_split_on_top_level_commas_only(config_file):
    runs = expand([str(config_file())], [], ["data.train_classes=[0,1], [1,2]", "train.lr_head=1e-3,'2e-3'"], None)
    assert [r.name for r in runs] == [
        "train_classes=[0,1],lr_head=1e-3",
        "train_classes=[0,1],lr_head='2e-3'",
        "train_classes=[1,2],lr_head=1e-3",
        "train_classes=[1,2],lr_head='2e-3'",
    ]
    assert [r.cfg.data.train_classes for r in runs[::2]] == [[0, 1], [1, 2]]
    assert parse_grid(["a={x: [1, 2]},b"]) == [("a", ["{x: [1, 2]}", "b"])]
    with pytest.raises(FinetuneError, match=r"--grid data.train_classes: '\[0,1' is not a comma-separated list"):
        parse_grid(["data.train_classes=[0,1"])


def test_a_sweep_rerun_continues_a_run_only_as_train_resume_would(tmp_path, capsys):
    """Bug 4: a 3-epoch run stopped after epoch 1, rerun with train.epochs=2, was resumed and
    trained `epoch 2/2`, rewriting config.yaml."""
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train={"epochs": 3})
    args = ["sweep", config, "--grid", "train.lr_backbone=1e-4", "--out", tmp_path / "sweep"]
    run = tmp_path / "sweep" / "lr_backbone=1e-4"
    proc = Finetune(*args)
    assert proc.wait_for(lambda: csv_rows(run) >= 1), proc.finish()
    proc.send_signal(signal.SIGKILL)
    proc.finish()
    saved = (run / "config.yaml").read_text()
    assert main([*map(str, args), "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"sweep: {run}: train.epochs may only be raised (run has 3), not lowered to 2" in err
    assert (run / "config.yaml").read_text() == saved
    assert main(["train", "--resume", str(run), "--set", "train.epochs=2"]) == 2
    assert f"--resume {run}: train.epochs may only be raised (run has 3), not lowered to 2" in capsys.readouterr().err


def test_tradeoff_marks_the_runs_no_other_beats_on_both_axes():
    points = pd.DataFrame({"run": list("abcd"), "cold_s": [10, 20, 15, 30], "judged_val_acc": [0.5, 0.7, 0.4, 0.7]})
    assert pareto_front(points) == [0, 1]
    ax = plot_tradeoff(points, "run").axes[0]
    labels = {t.get_text(): t.get_fontweight() for t in ax.texts}
    assert labels == {"a": "bold", "b": "bold", "c": "normal", "d": "normal"}
    circled = ax.collections[-1].get_offsets().tolist()
    assert circled == [[10, 0.5], [20, 0.7]]


def test_killed_sweep_rerun_skips_finished_runs_and_resumes_the_interrupted_one(tmp_path):
    data = make_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "runs", data={"batch_size": 4}, train={"epochs": 2})
    grid = ["--grid", "train.lr_backbone=1e-4,3e-4,1e-3"]
    reference, out = tmp_path / "reference", tmp_path / "sweep"
    assert main(["sweep", str(config), *grid, "--out", str(reference)]) == 0
    proc = Finetune("sweep", config, *grid, "--out", out)
    second = out / "lr_backbone=3e-4"
    deadline_hit = proc.wait_for(lambda: csv_rows(second) == 1)
    assert deadline_hit, "the sweep should reach the second run"
    proc.send_signal(signal.SIGKILL)
    proc.finish()
    assert csv_rows(out / "lr_backbone=1e-3") == 0, "killed inside the second run"
    rerun = Finetune("sweep", config, *grid, "--out", out)
    printed, err = rerun.finish()
    assert rerun.returncode == 0, err
    assert "[1/3] lr_backbone=1e-4: finished before, skipped" in printed
    assert "[2/3] lr_backbone=3e-4: resuming" in printed
    for name in ("lr_backbone=1e-4", "lr_backbone=3e-4", "lr_backbone=1e-3"):
        assert_same_as_reference(out / name, reference / name)


def test_a_sweep_under_torchrun_is_refused(config_file, monkeypatch, capsys):
    """Every rank would train every run into the same dirs."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert main(["sweep", str(config_file())]) == 2
    assert "under torchrun, use finetune train per config" in capsys.readouterr().err
