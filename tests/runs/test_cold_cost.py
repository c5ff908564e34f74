"""Honest cost (issue 24 item 3): a run that reuses another's cached features is charged what
computing them cost, and compare judges trade-offs on that cold cost, not on a run's place in
the queue."""

import shutil
import signal

import pandas as pd
import pytest
import torch
from conftest import make_imagefolder, write_config
from processes import Finetune, resume, stop_when

from finetune.cli import main
from finetune.runs.compare import SCORE, pareto_front, plot_tradeoff
from finetune.training.features import FeatureStore


def test_a_run_reusing_cached_features_is_charged_what_computing_them_cost(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "config.yaml", data, runs, train={"epochs": 2, "unfreeze_epoch": 1})
    for name in ("first", "second"):
        assert main(["train", str(config), "--run-dir", str(runs / name)]) == 0
    first, second = (pd.read_csv(runs / name / "results.csv") for name in ("first", "second"))

    (stored,) = (runs / ".feature_cache").glob("*.pt")
    ledger = FeatureStore(stored.parent).load(stored.stem, torch.device("cpu")).ledger
    cost = float(ledger.seconds.sum()) + ledger.val_seconds
    assert cost > 0
    assert first["feature_seconds"].tolist() == pytest.approx([cost, 0], rel=1e-5), "the head epoch paid, once"
    assert first["feature_seconds_reused"].tolist() == [0, 0]
    assert second["feature_seconds"].tolist() == [0, 0], "nothing left to compute"
    assert second["feature_seconds_reused"].tolist() == pytest.approx([cost, 0], rel=1e-5)

    out = tmp_path / "comparison"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv").set_index("run")
    for name, results in (("first", first), ("second", second)):
        total = results["epoch_seconds"].sum()
        assert table.loc[name, "total_s"] == pytest.approx(total)
        assert table.loc[name, "cold_s"] == pytest.approx(total + results["feature_seconds_reused"].sum())
    assert table.loc["second", "cold_s"] >= table.loc["second", "total_s"] + cost * (1 - 1e-5)

    old = shutil.copytree(runs / "second", tmp_path / "old" / "second", ignore=shutil.ignore_patterns("*.pt"))
    second.drop(columns=["feature_seconds", "feature_seconds_reused"]).to_csv(old / "results.csv", index=False)
    assert main(["compare", str(old), "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert table["cold_s"].tolist() == table["total_s"].tolist(), "a run from before the columns: as run"


def test_a_run_killed_after_computing_its_features_is_charged_them_after_resume(tmp_path):
    """kill -9 once the head epoch's features are on disk, before that epoch ends: the resumed
    run finds them done, yet its row says what they cost this run, as the uninterrupted run's
    would (before, it said 0 and compare's cold cost lost them)."""
    data = make_imagefolder(tmp_path / "data")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "config.yaml", data, runs, train={"epochs": 2, "unfreeze_epoch": 1})
    run = runs / "killed"
    proc = Finetune("train", config, "--run-dir", run)
    assert stop_when(proc, lambda: any((runs / ".feature_cache").glob("*.pt")), signal.SIGKILL) == -signal.SIGKILL
    resume(run)
    (stored,) = (runs / ".feature_cache").glob("*.pt")
    ledger = FeatureStore(stored.parent).load(stored.stem, torch.device("cpu")).ledger
    results = pd.read_csv(run / "results.csv")
    assert results["feature_seconds"].tolist() == pytest.approx([float(ledger.seconds.sum()) + ledger.val_seconds, 0])
    assert results["feature_seconds_reused"].tolist() == [0, 0], "its own features are not another run's"


def test_trade_offs_are_judged_on_the_cold_cost():
    """`queued` ran faster only because `paid` had computed the features it reused."""
    points = pd.DataFrame(
        {"run": ["paid", "queued"], SCORE: [0.9, 0.9], "total_s": [10.0, 1.0], "cold_s": [10.0, 11.0]}
    )
    assert pareto_front(points) == [0]
    ax = plot_tradeoff(points, "run").axes[0]
    assert ax.lines[0].get_xdata().tolist() == [10.0, 11.0]
    assert "cold" in ax.get_xlabel()
