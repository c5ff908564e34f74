"""What `data.sampler: balanced` does on imbalanced data (issue 26): a 10:1 CIFAR-10 subset, five
classes with `--major` training images and five with `--minor`, validated on a balanced set
(`--val` test images per class), trained as one `finetune sweep` over
data.sampler x train.class_weights x seeds.

The CSV (absolute paths into the data folder) and the sweep go under `--out`; nothing is copied.
The config: MobileNetV2 with ImageNet weights from a local file (`--weights`), its backbone
frozen, so every epoch trains the head on cached activations (computed once, shared by the runs).
Prints, and writes to `--out`/imbalance.md, per setup the final epoch's balanced accuracy (val
accuracy on the balanced val set), its recall on the minor and major classes, mean and spread
over seeds. Balanced + auto trains as balanced + none (auto yields to the sampler): checked.

    nice .venv/bin/python scripts/bench_imbalance.py                         # 96 px, 10 epochs, seeds 0-2
    nice .venv/bin/python scripts/bench_imbalance.py --epochs 2 --seeds 0    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/cifar10", help="holds train/<class>/ and test/<class>/")
    p.add_argument("--weights", default="/work/shared/weights/mobilenet_v2-b0353104.pth")
    p.add_argument("--major", type=int, default=300, help="training images of each of the first five classes")
    p.add_argument("--minor", type=int, default=30, help="training images of each of the last five classes")
    p.add_argument("--val", type=int, default=100, help="validation images per class, from test/")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="bench_results/imbalance")
    return p.parse_args(argv)


def write_csv(args: argparse.Namespace, path: Path) -> list[str]:
    """train rows from train/, val rows from test/, the first images of each class by name; the classes."""
    data = Path(args.data)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    rows = []
    for i, name in enumerate(classes):
        counts = (("train", "train", args.major if i < len(classes) // 2 else args.minor), ("test", "val", args.val))
        for folder, split, count in counts:
            files = sorted((data / folder / name).iterdir())[:count]
            rows += [{"file": str(f.resolve()), "label": name, "split": split} for f in files]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return classes


def write_config(args: argparse.Namespace, csv: Path, path: Path) -> None:
    cfg = {
        "name": "imbalance",
        "out_dir": str(path.parent / "runs"),
        "device": "cpu",
        "precision": "fp32",
        "data": {
            "dataset": "csv",
            "root": "/",
            "csv": str(csv.resolve()),
            "split_col": "split",
            "train_size": None,
            "val_size": None,
            "image_size": args.size,
            "batch_size": 64,
        },
        "model": {"arch": "mobilenet_v2", "weights": args.weights},
        "train": {"epochs": args.epochs, "freeze_backbone": True, "memory_format": "contiguous", "compile": "off"},
        "checkpoint": {"monitor": "val_balanced_acc", "keep": "all"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def final_row(run: Path, classes: list[str]) -> dict[str, float]:
    results = pd.read_csv(run / "results.csv")
    last = results.iloc[-1]
    half = len(classes) // 2
    recall = [last[f"val_acc_{c}"] for c in classes]
    return {
        "balanced_acc": last["val_balanced_acc"],
        "minor_recall": sum(recall[half:]) / (len(classes) - half),
        "major_recall": sum(recall[:half]) / half,
        "best_balanced_acc": results["val_balanced_acc"].max(),
    }


def setup_order(run: Path) -> tuple:
    """shuffle before balanced, class_weights none before auto, then seeds."""
    return "sampler=balanced" in run.name, "class_weights=auto" in run.name, run.name


def setup_name(run: Path) -> str:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return f"sampler {cfg['data']['sampler']}, class_weights {cfg['train']['class_weights']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (ROOT / args.out).resolve()
    classes = write_csv(args, out / "imbalance.csv")
    config = out / "imbalance.yaml"
    write_config(args, out / "imbalance.csv", config)
    sweep = out / "sweep"
    cmd = [sys.executable, "-m", "finetune.cli", "sweep", str(config), "--out", str(sweep), "--seeds", args.seeds]
    cmd += ["--grid", "data.sampler=shuffle,balanced", "--grid", "train.class_weights=none,auto"]
    subprocess.run(cmd, check=True)
    runs = sorted((p.parent for p in sweep.glob("*/summary.json")), key=setup_order)
    rows = pd.DataFrame([{"setup": setup_name(r), "run": r.name, **final_row(r, classes)} for r in runs])
    check_auto_yields(runs)
    metrics = ["balanced_acc", "minor_recall", "major_recall", "best_balanced_acc"]
    table = rows.groupby("setup", sort=False)[metrics].agg(["mean", "std"])
    text = report(args, table, len(runs))
    (out / "imbalance.md").write_text(text)
    print(text)
    return 0


def check_auto_yields(runs: list[Path]) -> None:
    """sampler balanced with class_weights auto trains the weights balanced + none trains."""
    by_name = {r.name: r for r in runs}
    for name, run in by_name.items():
        if "sampler=balanced" in name and "class_weights=auto" in name:
            twin = by_name[name.replace("class_weights=auto", "class_weights=none")]
            a, b = (torch.load(r / "last.pt", weights_only=True)["model"] for r in (run, twin))
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs from {twin.name}"
            assert json.loads((run / "summary.json").read_text())["class_weights"] is None


def report(args: argparse.Namespace, table: pd.DataFrame, runs: int) -> str:
    lines = [
        f"CIFAR-10, {args.major} train images in 5 classes and {args.minor} in 5, {args.val} val images per class; "
        f"MobileNetV2 (ImageNet) frozen, head only, {args.size} px, {args.epochs} epochs, seeds {args.seeds} "
        f"({runs} runs). The final epoch's numbers, and the best epoch's balanced accuracy (picked on the "
        "same val set, so optimistic), mean ± std over seeds:",
        "",
        "| setup | balanced accuracy | recall, 5 minor classes | recall, 5 major classes | best epoch's |",
        "|:--|--:|--:|--:|--:|",
    ]
    for setup, row in table.iterrows():
        cells = [f"{row[(m, 'mean')]:.3f} ± {row[(m, 'std')]:.3f}" for m in table.columns.get_level_values(0).unique()]
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
