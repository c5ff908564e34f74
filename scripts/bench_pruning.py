"""What pruning saves in `finetune tune`, and what it costs (issue 17): one study with the median
pruner and the same study without pruning, on the same config, space, seed and trials.

TPE's first 10 trials are random draws seeded by (seed, trial number), so both studies train
the same first 10 trials (checked), and the unpruned one shows what each pruned trial would
have reached; later trials are drawn from each study's own results. Without pruning every trial
trains all its epochs (early stopping is off in the config). Prints, and writes to
`--out`/pruning.md:
- the epochs (and whole-network epochs) the pruned study trained, as a share of the unpruned's;
- each study's wall time;
- each study's best, and whether the pruned best is within noise of the unpruned best (two
  binomial standard errors of accuracy on the validation set, Agresti-Coull).

    .venv/bin/python scripts/bench.py --pruning                     # digits, MobileNetV2, 10 x 10 epochs
    .venv/bin/python scripts/bench_pruning.py --trials 2 --epochs 5  # a smoke test (the space needs 5)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG, SPACE = ROOT / "configs" / "tune_unfreeze.yaml", ROOT / "configs" / "space_unfreeze.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", nargs="*", default=[], help="more --set for both studies (fp32 is pinned)")
    p.add_argument("--out", default="bench_results/pruning")
    return p.parse_args(argv)


def run_study(args: argparse.Namespace, pruner: str, out: Path) -> float:
    """Seconds of one `finetune tune` process."""
    sets = [f"train.epochs={args.epochs}", "precision=fp32", *args.sets]  # fp32: the same numerics in both
    cmd = [sys.executable, "-m", "finetune.cli", "tune", str(CONFIG), "--space", str(SPACE)]
    cmd += ["--trials", str(args.trials), "--seed", str(args.seed), "--pruner", pruner, "--out", str(out)]
    shutil.rmtree(out, ignore_errors=True)  # a new study, not the continuation of an old one
    started = time.perf_counter()
    subprocess.run([*cmd, "--set", *sets], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def trials(study: Path) -> pd.DataFrame:
    """One row per trial: its values, epochs trained (all, whole-network), best, pruned."""
    rows = []
    for run in sorted(study.glob("trial-*")):
        results = pd.read_csv(run / "results.csv")
        summary = json.loads((run / "summary.json").read_text())
        train = yaml.safe_load((run / "config.yaml").read_text())["train"]  # the trial's drawn values live here
        values = {key: train[key.removeprefix("train.")] for key in yaml.safe_load(SPACE.read_text())}
        rows.append(
            {
                "trial": run.name,
                "values": json.dumps(values, sort_keys=True),
                "epochs": len(results),
                "whole epochs": int((results["stage"] == "backbone").sum()),
                "best": summary["best_value"],
                "pruned at": (summary.get("pruned") or {}).get("epoch"),
                "val images": summary["val_size"],
            }
        )
    return pd.DataFrame(rows).set_index("trial")


def report(args: argparse.Namespace, pruned: pd.DataFrame, full: pd.DataFrame, seconds: dict[str, float]) -> str:
    first = min(10, len(full), len(pruned))  # TPE's seeded random start-up
    same = (pruned["values"].iloc[:first] == full["values"].iloc[:first]).all()
    share = pruned["epochs"].sum() / full["epochs"].sum()
    whole = pruned["whole epochs"].sum() / max(1, full["whole epochs"].sum())
    best_pruned, best_full = pruned["best"].max(), full["best"].max()
    n = int(full["val images"].iloc[0])
    p = (best_full * n + 2) / (n + 4)  # Agresti-Coull: a best of 1.0 still has a standard error
    noise = 2 * math.sqrt(p * (1 - p) / (n + 4))
    same_best = (pruned["best"].iloc[:first].max(), full["best"].iloc[:first].max())
    table = full[["epochs", "whole epochs", "best"]].add_suffix(" (none)")
    table = table.join(pruned[["epochs", "whole epochs", "best", "pruned at"]].add_suffix(" (median)"))
    lines = [
        f"# Pruning: {args.trials} trials of {CONFIG.name} ({args.epochs} epochs), seed {args.seed}",
        "",
        table.to_markdown(floatfmt=".4g"),
        "",
        f"- the first {first} trials the same in both studies: {'yes' if same else 'NO: the comparison does not hold'}",
        f"- epochs: {pruned['epochs'].sum()} of {full['epochs'].sum()} ({share:.0%}; goal at most 60%); "
        f"whole-network epochs: {pruned['whole epochs'].sum()} of {full['whole epochs'].sum()} ({whole:.0%})",
        f"- wall time: {seconds['median']:.0f} s with pruning, {seconds['none']:.0f} s without "
        f"({seconds['median'] / seconds['none']:.0%})",
        f"- best val: {best_pruned:.4f} with pruning, {best_full:.4f} without; noise (2 binomial SE on {n} "
        f"images) {noise:.4f}: {'within' if best_full - best_pruned <= noise else 'NOT within'} noise; "
        f"of the first {first} trials (the same in both): {same_best[0]:.4f} with pruning, {same_best[1]:.4f} without",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds = {pruner: run_study(args, pruner, out / pruner) for pruner in ("none", "median")}
    text = report(args, trials(out / "median"), trials(out / "none"), seconds)
    print(text)
    (out / "pruning.md").write_text(text)


if __name__ == "__main__":
    main()
