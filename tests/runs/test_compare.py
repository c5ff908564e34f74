import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_imagefolder, write_config
from PIL import Image

from finetune.cli import main
from finetune.runs.compare import find_runs, per_class_table, plot_curves, plot_per_class


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs that differ in schedule and backbone LR, and one stopped after epoch 1."""
    root = tmp_path_factory.mktemp("compare")
    data = make_imagefolder(root / "data")
    config = write_config(root / "config.yaml", data, root / "runs", train={"epochs": 2})
    for name, sets in {
        "frozen": ["train.unfreeze_epoch=null"],
        "early": ["train.unfreeze_epoch=1", "train.lr_backbone=3e-4"],
    }.items():
        assert main(["train", str(config), "--run-dir", str(root / "runs" / name), "--set", *sets]) == 0
    stopped = root / "runs" / "stopped"
    one_epoch = ["train.epochs=1", "train.unfreeze_epoch=0"]
    assert main(["train", str(config), "--run-dir", str(stopped), "--set", *one_epoch]) == 0
    cfg = yaml.safe_load((stopped / "config.yaml").read_text())
    cfg["train"]["epochs"] = 3  # as if it were killed after its first epoch of three
    (stopped / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root / "runs"


def test_compare_writes_tables_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "stopped finished 1/3 epochs; using those" in printed.err
    assert printed.out.startswith("| run"), "stdout holds the table alone"
    table = pd.read_csv(out / "comparison.csv")
    assert set(table["run"]) == {"frozen", "early", "stopped"}
    # the keys that differ are found from config.yaml; name/out_dir and equal keys are not columns
    assert {"train.unfreeze_epoch", "train.lr_backbone", "train.epochs"} <= set(table.columns)
    assert "name" not in table.columns and "data.batch_size" not in table.columns
    assert table["best_val_acc"].is_monotonic_decreasing
    early = table.set_index("run").loc["early"]
    results = pd.read_csv(runs / "early" / "results.csv")
    assert early["final_val_acc"] == pytest.approx(results["val_acc"].iloc[-1])
    assert early["s_per_epoch_backbone"] == pytest.approx(results["epoch_seconds"].iloc[1])
    assert early["s_per_epoch_head"] == pytest.approx(results["epoch_seconds"].iloc[0])
    assert early["monitor"] == "val_acc"
    assert table.set_index("run").loc["stopped", "epochs"] == "1/3 (stopped)"
    assert (out / "comparison.md").read_text().startswith("| run")
    for name in ("curves.png", "per_class.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 600 and img.height > 300
    per_class = pd.read_csv(out / "per_class.csv", index_col="class")
    assert list(per_class.index) == ["cat", "dog", "frog"]


def test_curves_plot_one_line_per_run_with_its_values_and_unfreeze(runs):
    found = find_runs([str(runs / "*")])
    fig = plot_curves(found)
    acc_ax, loss_ax = fig.axes
    lines = {line.get_label(): line for line in acc_ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {r.name for r in found}
    for run in found:
        assert np.allclose(lines[run.name].get_ydata(), run.results["val_acc"])
        assert list(lines[run.name].get_xdata()) == run.results["epoch"].tolist()
    markers = [line for line in acc_ax.get_lines() if line.get_label().startswith("_")]
    assert [m.get_xdata()[0] for m in markers] == [1.5]  # only "early" unfreezes, before epoch 2
    assert acc_ax.get_xlabel() == "epoch" and acc_ax.get_title() == "Validation accuracy"
    assert loss_ax.get_title() == "Validation loss"


def test_per_class_plot_has_a_bar_group_per_run(runs):
    found = find_runs([str(runs)])
    table = per_class_table(found)
    fig = plot_per_class(table)
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx(table.to_numpy().T.flatten().tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "frog"]


def test_runs_with_different_classes_compare_on_common_columns(runs, tmp_path, capsys):
    data = make_imagefolder(tmp_path / "other", classes=("cat", "dog", "owl"))
    config = write_config(tmp_path / "c.yaml", data, tmp_path, train={"epochs": 1, "unfreeze_epoch": None})
    assert main(["train", str(config), "--run-dir", str(tmp_path / "owls")]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "frozen"), str(tmp_path / "owls"), "--out", str(out)]) == 0
    assert "different classes" in capsys.readouterr().err
    assert list(pd.read_csv(out / "per_class.csv")["class"]) == ["cat", "dog"]


def test_compare_without_runs_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: compare: no runs")


def test_compare_json_holds_the_table_and_stdout_nothing_else(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = pd.read_csv(out / "comparison.csv")
    assert [row["run"] for row in printed["runs"]] == table["run"].tolist()
    assert [row["best_val_acc"] for row in printed["runs"]] == pytest.approx(table["best_val_acc"].tolist())
    assert printed["seeds"] is None


def test_a_sweep_over_folds_is_cross_validation_with_mean_and_std_over_folds(imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", imagefolder, tmp_path / "runs", train={"epochs": 1})
    out = tmp_path / "cv"
    sets = ["data.folds=3", "train.unfreeze_epoch=null", "train.lr_head=0.01"]
    assert main(["sweep", str(config), "--grid", "data.fold=0,1,2", "--set", *sets, "--out", str(out)]) == 0
    val_sizes = [json.loads((out / f"fold={k}" / "summary.json").read_text())["val_size"] for k in range(3)]
    assert val_sizes == [8, 8, 8], "each fold validates on a third of the 24 training images"
    runs = pd.read_csv(out / "comparison" / "comparison.csv")
    folds = pd.read_csv(out / "comparison" / "seeds.csv")
    assert folds[["setting", "runs", "over"]].values.tolist() == [["all", 3, "fold"]]
    assert folds["best_val_acc"].iloc[0] == pytest.approx(runs["best_val_acc"].mean())
    assert folds["best_val_acc_std"].iloc[0] == pytest.approx(runs["best_val_acc"].std())
    capsys.readouterr()
    assert main(["compare", str(out / "fold=*"), "--out", str(tmp_path / "cmp"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seeds"][0]["runs"] == 3
