import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import assert_renders
from conftest import make_imagefolder, write_config
from PIL import Image

from finetune.cli import main
from finetune.runs.compare import curve_lines, find_runs, pareto_front, per_class_table, tie_note
from finetune.runs.compare_plots import plot_curves, plot_per_class

STAGED = "sweep-staged/unfreeze#2,scheduler#2,lr_backbone=0.0003"  # as sweep names a run in a grid
STAGES = "train.unfreeze=[{epoch: 0, modules: [layer4]}, {epoch: 1, modules: [layer3]}]"
PLOTS = ("curves.png", "per_class.png", "tradeoff.png")


def copy_run(src: Path, dst: Path, config=None, summary=None, rows=None) -> Path:
    """A copy of a real run, edited as a run in another state would hold it (no checkpoints)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt"))
    for name, edit in (("config.yaml", config), ("summary.json", summary)):
        if edit:
            load, dump = (yaml.safe_load, yaml.safe_dump) if name.endswith("yaml") else (json.loads, json.dumps)
            data = load((dst / name).read_text())
            edit(data)
            (dst / name).write_text(dump(data))
    if rows is not None:
        pd.read_csv(dst / "results.csv").iloc[:rows].to_csv(dst / "results.csv", index=False)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs as train and sweep lay them out: `frozen` and `frozen-seed1` differ only in
    seed, a staged cosine run sits in a sweep folder, and `stopped` is a copy of `frozen`
    whose config asks for 3 epochs: a run still in progress."""
    root = tmp_path_factory.mktemp("compare")
    data = make_imagefolder(root / "data")
    config = write_config(root / "config.yaml", data, root / "runs", train={"epochs": 2})
    runs = root / "runs"
    for name, sets in {
        "frozen": ["train.unfreeze_epoch=null"],
        "frozen-seed1": ["train.unfreeze_epoch=null", "seed=1"],
        STAGED: [
            "train.unfreeze_epoch=null",
            STAGES,
            "train.scheduler={name: cosine, warmup_epochs: 0.5}",
            "train.lr_backbone=3e-4",
        ],
    }.items():
        assert main(["train", str(config), "--run-dir", str(runs / name), "--set", *sets]) == 0
    copy_run(runs / "frozen", runs / "stopped", config=lambda c: c["train"].update(epochs=3))
    return runs


@pytest.fixture(scope="module")
def others(runs, tmp_path_factory):
    """Runs that share nothing with `runs`: digits 0-9 on another backbone, a tune trial its
    pruner ended after epoch 1, and a run whose results.csv holds no epoch yet."""
    root = tmp_path_factory.mktemp("others")
    config = write_config(root / "config.yaml", root, root, train={"epochs": 1, "unfreeze_epoch": None})
    digits = ["data.dataset=digits", "data.train_size=40", "data.val_size=20", "model.arch=mobilenet_v3_small"]
    assert main(["train", str(config), "--run-dir", str(root / "digits"), "--set", *digits]) == 0
    pruned = {"epoch": 1, "reason": "below the median of earlier trials at epoch 1"}
    copy_run(runs / "frozen", root / "tune-tiny" / "trial-0003", summary=lambda s: s.update(pruned=pruned), rows=1)
    copy_run(runs / "frozen", root / "empty", rows=0)
    (copy_run(runs / "frozen", root / "starting") / "results.csv").unlink()  # before its first epoch
    return root


def printed_lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def test_compare_writes_tables_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "stopped finished 2/3 epochs; using those" in printed.err
    assert printed.out.startswith("| run"), "stdout holds the table alone"
    table = pd.read_csv(out / "comparison.csv")
    assert set(table["run"]) == {"frozen", "frozen-seed1", STAGED, "stopped"}
    # the keys that differ are found from config.yaml; name/out_dir and equal keys are not columns
    assert {"seed", "train.unfreeze", "train.lr_backbone", "train.epochs"} <= set(table.columns)
    assert "name" not in table.columns and "data.batch_size" not in table.columns
    assert table["judged_val_acc"].is_monotonic_decreasing
    staged = table.set_index("run").loc[STAGED]
    results = pd.read_csv(runs / STAGED / "results.csv")
    assert staged["final_val_acc"] == pytest.approx(results["val_acc"].iloc[-1])
    assert staged["s_per_epoch_layer4"] == pytest.approx(results["epoch_seconds"].iloc[0])
    assert staged["s_per_epoch_layer3"] == pytest.approx(results["epoch_seconds"].iloc[1])
    assert staged["monitor"] == "val_acc"
    assert table.set_index("run").loc["stopped", "epochs"] == "2/3 (stopped)"
    assert (out / "comparison.md").read_text().startswith("| run")
    for name in PLOTS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 600 and img.height > 300
    per_class = pd.read_csv(out / "per_class.csv", index_col="class")
    assert list(per_class.index) == ["cat", "dog", "frog"]


def test_compare_html_is_one_page_of_tables_plots_and_noise_that_chromium_loads(runs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out), "--html"]) == 0
    page = out / "report.html"
    text = page.read_text()
    n_val = pd.read_csv(out / "comparison.csv")["n_val"].iloc[0]
    assert f"On {n_val} validation images one image is {1 / n_val:.4f} of accuracy" in text
    for heading in ("Runs", "Settings repeated over seeds or folds", "Curves", "Accuracy against training time"):
        assert f"<h2>{heading}" in text
    assert text.count("data:image/png;base64,") == len(PLOTS)
    assert_renders(page, tmp_path, least_images=len(PLOTS))


def test_the_terminal_table_fits_160_columns_and_the_csv_keeps_every_value(runs, tmp_path, capsys):
    """A staged cosine run's config holds a list of stage dicts and a scheduler dict: the
    terminal shows them summarized, the CSV whole, and a column left out is named on stderr."""
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = printed_lines(printed.out)
    assert max(map(len, lines)) <= 160, "\n".join(lines)
    assert "{" not in printed.out, "structured values are summarized, not dumped"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = pd.read_csv(out / "comparison.csv")
    keys = [c for c in table.columns if c == "seed" or c.startswith(("train.", "data.", "model."))]
    for key in keys:
        assert {key, key.rsplit(".", 1)[-1]} & set(header) or key in printed.err, f"{key}: shown, or named as left out"
    stages = yaml.safe_load((runs / STAGED / "config.yaml").read_text())["train"]["unfreeze"]
    assert json.loads(table.set_index("run").loc[STAGED, "train.unfreeze"]) == stages
    readable = (out / "comparison.md").read_text()
    assert "layer4@0,layer3@1" in readable and "cosine(warmup_epochs 0.5)" in readable
    assert "constant(warmup_epochs 0.0)" in readable, "a scheduler shows the fields that differ"


def test_any_mix_of_runs_gives_the_table_and_every_plot(runs, others, tmp_path, capsys):
    """Disjoint classes, another backbone, a run in progress, a pruned trial, an empty
    results.csv and none yet: exit 0, the table, and the per-class plot left out with a note."""
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), str(others), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("| run")
    assert "skipping" in printed.err and "empty: no epoch finished yet" in printed.err
    assert "starting: no epoch finished yet" in printed.err, "a run dir without results.csv is named, not passed over"
    assert "share no classes" in printed.err
    table = pd.read_csv(out / "comparison.csv").set_index("run")
    assert table.loc["tune-tiny/trial-0003", "epochs"] == "1/2 (pruned)"
    assert "model.arch" in table.columns and not {"empty", "starting"} & set(table.index)
    for name in ("curves.png", "tradeoff.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    assert not (out / "per_class.png").exists() and not (out / "per_class.csv").exists()


def test_runs_with_different_classes_compare_on_common_columns(runs, tmp_path, capsys):
    data = make_imagefolder(tmp_path / "other", classes=("cat", "dog", "owl"))
    config = write_config(tmp_path / "c.yaml", data, tmp_path, train={"epochs": 1, "unfreeze_epoch": None})
    assert main(["train", str(config), "--run-dir", str(tmp_path / "owls")]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(runs / "frozen"), str(tmp_path / "owls"), "--out", str(out)]) == 0
    assert "different classes" in capsys.readouterr().err
    assert list(pd.read_csv(out / "per_class.csv")["class"]) == ["cat", "dog"]
    with Image.open(out / "per_class.png") as img:
        assert img.format == "PNG"


def test_runs_are_found_at_any_depth_and_named_by_their_path(runs, tmp_path, capsys):
    """Two studies each with a trial-0001 stay apart; a run's own subfolders are not searched."""
    root = tmp_path / "all"
    for study in ("tune-a", "tune-b"):
        copy_run(runs / "frozen", root / "deep" / study / "trial-0001")
    decoy = copy_run(runs / "frozen", root / "deep" / "tune-a" / "trial-0001" / "tensorboard" / "x")
    names = sorted(r.name for r in find_runs([str(root)]))
    assert names == ["deep/tune-a/trial-0001", "deep/tune-b/trial-0001"]
    assert [r.name for r in find_runs([str(decoy.parent.parent)])] == ["trial-0001"]
    by_folder = {r.name for r in find_runs([str(root / "deep" / "tune-a"), str(root / "deep" / "tune-b")])}
    assert by_folder == {"tune-a/trial-0001", "tune-b/trial-0001"}, "apart when named inside each folder alike"
    in_sweep = STAGED.split("/")[1]  # `runs/*` matches the sweep folder: named inside it
    assert {r.name for r in find_runs([str(runs / "*")])} == {"frozen", "frozen-seed1", "stopped", in_sweep}


def test_curves_draw_train_dashed_and_val_solid_and_seeds_as_one_band(runs):
    found = find_runs([str(runs)])
    lines = curve_lines(found)
    seeds = next(label for label, group in lines.items() if len(group) == 2)
    assert {r.name for r in lines[seeds]} == {"frozen", "frozen-seed1"} and "2 runs" in seeds
    fig = plot_curves(lines)
    acc_ax, loss_ax = fig.axes
    drawn = {line.get_label(): line for line in acc_ax.get_lines()}
    assert set(lines) <= set(drawn), "one legend entry per run or setting"
    for label, group in lines.items():
        val, train = drawn[label], drawn[f"_train {label}"]
        assert val.get_linestyle() == "-" and train.get_linestyle() == "--"
        assert val.get_color() == train.get_color()
        stacked = np.array([r.results["val_acc"].to_numpy() for r in group])
        assert np.allclose(val.get_ydata(), stacked.mean(axis=0))
        assert np.allclose(train.get_ydata(), np.mean([r.results["train_acc"] for r in group], axis=0))
    bands = [c for c in acc_ax.collections if c.get_label() == f"_band {seeds}"]
    assert len(bands) == 2, "a min-max band around train and around val"
    val_band = bands[0].get_paths()[0].vertices[:, 1]
    stacked = np.array([r.results["val_acc"] for r in lines[seeds]])
    assert val_band.min() == pytest.approx(stacked.min()) and val_band.max() == pytest.approx(stacked.max())
    markers = [line for line in acc_ax.get_lines() if line.get_label().startswith("_stage")]
    assert [m.get_xdata()[0] for m in markers] == [1.5]  # only the staged run's layer3 joins, before epoch 2
    assert acc_ax.get_title() == "Accuracy" and loss_ax.get_title() == "Loss"


def test_per_class_plot_has_a_bar_group_per_run(runs):
    found = find_runs([str(runs)])
    table = per_class_table(found)
    fig = plot_per_class(table)
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx(table.to_numpy().T.flatten().tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "frog"]


def test_the_top_two_within_the_validation_noise_are_called_tied(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    table = pd.read_csv(out / "comparison.csv")
    assert (table["n_val"] == 12).all(), "summary.json's val_size: 4 images of each of 3 classes"
    p = table["judged_val_acc"]
    assert table["noise"].to_numpy() == pytest.approx(np.sqrt(p * (1 - p) / 12))
    first, second = table.iloc[0], table.iloc[1]
    pooled = (first["judged_val_acc"] + second["judged_val_acc"]) / 2
    tied = first["judged_val_acc"] - second["judged_val_acc"] <= math.sqrt(pooled * (1 - pooled) / 12)
    assert ("treat them as tied" in err) == tied


def test_the_tie_note_counts_images_and_names_the_noise():
    table = pd.DataFrame(
        {"run": ["a", "b", "c"], "judged_val_acc": [0.62, 0.615, 0.5], "n_val": [200, 200, 200], "noise": 0.0}
    )
    assert tie_note(table) == (
        "a and b differ by 0.005 (1 image of 200), within the validation noise (±0.034): treat them as tied"
    )
    assert tie_note(table.assign(n_val=20_000)) is None
    assert tie_note(table.assign(n_val=float("nan"))) is None, "no noise claimed without a validation size"
    assert tie_note(table.iloc[:1]) is None


def test_runs_are_ranked_by_the_epochs_of_their_last_stage_and_say_where_their_best_came_from(runs, tmp_path):
    """Copies of the staged run (layer4 joins for epoch 1, layer3 for epoch 2): a plateau run whose
    best epoch came before its last stage, a steady one, and a plateau run that monitors val_loss.
    Judged by checkpoint.judge (last_stage), the steady run is the best and the only best trade-off."""
    folder = tmp_path / "runs"
    edits = {"plateau": ([0.9, 0.5], None), "steady": ([0.6, 0.7], None), "by-loss": ([0.9, 0.5], [0.2, 0.8])}
    for name, (accs, losses) in edits.items():
        monitor = {"monitor": "val_loss" if losses else "val_acc"}
        run = copy_run(runs / STAGED, folder / name, config=lambda c, m=monitor: c["checkpoint"].update(m))
        results = pd.read_csv(run / "results.csv").assign(val_acc=accs)
        results.assign(val_loss=losses or results["val_loss"]).to_csv(run / "results.csv", index=False)
    assert main(["compare", str(folder), "--out", str(tmp_path / "cmp")]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    columns = ["best_val_acc", "best_stage", "judged", "judged_val_acc"]
    by_run = table.set_index("run")
    assert by_run.loc["plateau", columns].tolist() == [0.9, "layer4", 0.5, 0.5]
    assert by_run.loc["steady", columns].tolist() == [0.7, "layer3", 0.7, 0.7]
    assert by_run.loc["by-loss", columns].tolist() == [0.9, "layer4", 0.8, 0.5], "judged: the loss; scored: its acc"
    assert table["run"].iloc[0] == "steady", "ranked by the judged epochs' accuracy"
    assert pareto_front(table) == [0]


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
    assert [row["n_val"] for row in printed["runs"]] == [12] * 4
    assert sorted(row["runs"] for row in printed["seeds"]) == [1, 1, 2], "frozen and frozen-seed1 repeat one setting"


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
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "parent"), "--json"]) == 0
    names = [row["run"] for row in json.loads(capsys.readouterr().out)["runs"]]
    assert sorted(names) == ["cv/fold=0", "cv/fold=1", "cv/fold=2"], "the sweep's parent: runs found inside it"
