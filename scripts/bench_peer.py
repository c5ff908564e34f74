"""`auto` beside every fixed runtime choice and the Lightning peer on one config (issue 24's
speed check): configs/bench_mobilenet_v2_128.yaml, MobileNetV2 at 128 px, 1000 train / 500 val
CIFAR-10 images from the local image folder, one head epoch, then the whole network.

First `finetune calibrate` measures the runtime choice into an empty cache (timed and reported
on its own: the choice is made once per machine, model, size and batch and kept); then each
round trains the config with `auto` (reading that cache), with each fixed precision x memory
format, and scripts/bench_lightning.py, in a rotating order so that load falls on all alike.
Every run has a folder of its own (no feature cache shared). A cell is the fastest of the
rounds: load only slows a run down. Prints a markdown table (whole-run seconds, seconds of an
unfrozen epoch, each over the fastest fixed choice and over Lightning) and writes it to
--out/peer.md, every round's numbers to --out/peer_rounds.csv.

    .venv/bin/python scripts/bench.py --peer                    # the real check, 2 rounds
    .venv/bin/python scripts/bench_peer.py --rounds 3
    .venv/bin/python scripts/bench_peer.py --quick              # a smoke test: 64 / 64 images, 32 px, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from bench import format_table, run_child, run_result

from finetune.config.load import load_config
from finetune.config.schema import Config
from finetune.runtime.candidates import candidates
from finetune.runtime.hardware import device_name, native_precisions

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CONFIG = ROOT / "configs" / "bench_mobilenet_v2_128.yaml"
LIGHTNING = ROOT / "scripts" / "bench_lightning.py"
QUICK = ["data.train_size=64", "data.val_size=64", "data.image_size=32", "train.epochs=2"]
WITHIN = 0.05  # auto's whole run may take this much over the fastest fixed choice's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10"), help="image folder: train/ and val/ or test/")
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2-b0353104.pth"), help="for Lightning")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="Lightning's DataLoader workers")
    p.add_argument("--quick", action="store_true", help="a smoke test: " + " ".join(QUICK))
    p.add_argument("--out", default="bench_results/peer")
    return p.parse_args(argv)


def finetune_sets(args: argparse.Namespace) -> list[str]:
    """What every finetune command of the benchmark sets: the local images, the device, --quick."""
    return [
        "data.dataset=imagefolder",
        f"data.root={args.data}",
        f"device={args.device}",
        *(QUICK if args.quick else []),
    ]


def fixed_choices(device: str) -> dict[str, list[str]]:
    """Each fixed (precision, memory format) the device runs, as its label and --set overrides."""
    options = candidates("auto", "auto", native_precisions(torch.device(device)))
    return {c.label: [f"precision={c.precision}", f"train.memory_format={c.memory_format}"] for c in options}


def calibrate(args: argparse.Namespace) -> tuple[float, str]:
    """Wall seconds of `finetune calibrate` on the config, and what it printed."""
    cmd = [sys.executable, "-m", "finetune.cli", "calibrate", args.config, "--set", *finetune_sets(args)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"finetune calibrate failed ({done.returncode}): {done.stderr.strip()}")
    return time.perf_counter() - started, done.stdout.strip()


def finetune_run(args: argparse.Namespace, sets: list[str], out_dir: Path) -> dict:
    """One `finetune train` of the config in a folder of its own."""
    run_dir = out_dir / "run"
    cmd = [sys.executable, "-m", "finetune.cli", "train", args.config, "--run-dir", str(run_dir)]
    wall, _ = run_child([*cmd, "--set", *finetune_sets(args), f"out_dir={out_dir}", *sets])
    result = run_result(run_dir)
    how = result["runtime"].get("decided_by")
    return {"wall": wall, "choice": result["choice"] + (f" ({how})" if how else ""), "epochs": result["epochs"]}


def lightning_args(cfg: Config, args: argparse.Namespace) -> list[str]:
    """bench_lightning.py's arguments for the config's job; one that it cannot mirror stops here."""
    t, d = cfg.train, cfg.data
    if not t.freeze_backbone or t.unfreeze_epoch is None or t.unfreeze is not None or t.optimizer == "sgd":
        raise SystemExit("the Lightning peer mirrors a head-then-backbone schedule with adam or adamw only")
    return [
        *("--data", args.data, "--weights", args.weights, "--workers", str(args.workers)),
        *("--train", str(d.train_size), "--val", str(d.val_size), "--size", str(d.image_size)),
        *("--batch-size", str(d.batch_size), "--epochs", str(t.epochs), "--unfreeze-epoch", str(t.unfreeze_epoch)),
        *("--lr-head", str(t.lr_head), "--lr-backbone", str(t.lr_backbone), "--optimizer", t.optimizer),
        *("--weight-decay", str(t.weight_decay), "--seed", str(cfg.seed), "--split-seed", str(d.split_seed)),
        *("--accelerator", "gpu" if args.device.startswith("cuda") else "cpu"),
    ]


def lightning_run(peer_args: list[str], out: Path) -> dict:
    wall, _ = run_child([sys.executable, str(LIGHTNING), *peer_args, "--out", str(out)])
    result = json.loads(out.read_text())
    return {"wall": wall, "choice": result["choice"], "epochs": result["epochs"]}


def measured(name: str, round_: int, result: dict) -> dict:
    """One run as a row: whole-run seconds, the mean of its unfrozen (backbone) epochs."""
    unfrozen = [e["epoch_seconds"] for e in result["epochs"] if e["stage"] == "backbone"]
    return {
        "round": round_,
        "contender": name,
        "choice": result["choice"],
        "whole run s": result["wall"],
        "unfrozen epoch s": sum(unfrozen) / len(unfrozen) if unfrozen else float("nan"),
        "final val acc": result["epochs"][-1]["val_acc"],
    }


def run_rounds(args: argparse.Namespace, cfg: Config, runs: Path) -> pd.DataFrame:
    """Every contender once a round, the order rotated by one each round."""
    contenders = {"auto": [], **fixed_choices(args.device), "lightning": None}
    names, peer_args, rows = list(contenders), lightning_args(cfg, args), []
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = runs / f"round{r + 1}-{name.replace(' ', '-')}"
            sets = contenders[name]
            result = lightning_run(peer_args, out / "lightning.json") if sets is None else finetune_run(args, sets, out)
            rows.append(measured(name, r + 1, result))
            print(f"round {r + 1} {name}: {rows[-1]}", file=sys.stderr)
    return pd.DataFrame(rows)


def summary(per_round: pd.DataFrame, fixed: list[str]) -> pd.DataFrame:
    """Each contender's fastest round; each time beside it over the fastest fixed choice's and Lightning's."""
    best = per_round.groupby("contender", sort=False).agg(
        {"choice": "last", "whole run s": "min", "unfrozen epoch s": "min", "final val acc": "last"}
    )
    columns = ["choice"]
    for column in ("whole run s", "unfrozen epoch s"):
        name = column.split()[0]
        best[f"{name} / fastest fixed"] = best[column] / best.loc[fixed, column].min()
        best[f"{name} / lightning"] = best[column] / best.loc["lightning", column]
        columns += [column, f"{name} / fastest fixed", f"{name} / lightning"]
    return best[[*columns, "final val acc"]].reset_index()


def load_line(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    cores = os.cpu_count() or 1
    state = "loaded: other work shared it, so these times are indicative only" if before[0] >= cores / 2 else "idle"
    return (
        f"- machine: 1-min load average {before[0]:.2f} on {cores} cores before the benchmark ({state}); "
        f"{after[0]:.2f} at its end (the benchmark included)"
    )


def verdict(table: pd.DataFrame, fixed: list[str]) -> list[str]:
    """The two checks of issue 24's "done when", on the fastest rounds."""
    rows = table.set_index("contender")
    auto, peer = rows.loc["auto"], rows.loc["lightning"]
    fastest = rows.loc[fixed, "whole run s"].idxmin()
    within = "yes" if auto["whole / fastest fixed"] <= 1 + WITHIN else "NO"
    no_slower = "yes" if auto["unfrozen epoch s"] <= peer["unfrozen epoch s"] else "NO"
    return [
        f"- auto's whole run: {auto['whole run s']:.1f} s, {auto['whole / fastest fixed']:.3f}x the fastest fixed "
        f"choice ({fastest}, {rows.loc[fastest, 'whole run s']:.1f} s): within {WITHIN:.0%}: {within}",
        f"- auto's unfrozen epoch: {auto['unfrozen epoch s']:.2f} s, Lightning's {peer['unfrozen epoch s']:.2f} s "
        f"({auto['unfrozen / lightning']:.3f}x): no slower: {no_slower}",
    ]


def render(
    args: argparse.Namespace, cfg: Config, table: pd.DataFrame, calibration: tuple[float, str], load: str
) -> str:
    fixed = list(fixed_choices(args.device))
    d, t = cfg.data, cfg.train
    seconds, printed = calibration
    lines = [
        f"# auto, fixed choices and Lightning: {cfg.model.arch}, {d.image_size} px, {d.train_size} train / "
        f"{d.val_size} val CIFAR-10 images, {t.epochs} epochs ({t.unfreeze_epoch} head-only), "
        f"{device_name(torch.device(args.device))}, {os.cpu_count()} CPU cores",
        "",
        format_table(table),
        "",
        *verdict(table, fixed),
        f"- one-off measurement (`finetune calibrate`, not in auto's whole run): {seconds:.1f} s; it printed: "
        + " / ".join(printed.splitlines()),
        f"- each cell: the fastest of {args.rounds} round(s), contenders in a rotating order; an unfrozen epoch is "
        "its training and validation; every round in peer_rounds.csv",
        load,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    cache = out / "calibration_cache"  # empty: the one-off measurement is this benchmark's own
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FINETUNE_CACHE_DIR"] = str(cache)
    cfg = load_config(args.config, finetune_sets(args))
    calibration = calibrate(args)
    with tempfile.TemporaryDirectory(dir=out) as runs:
        per_round = run_rounds(args, cfg, Path(runs))
    table = summary(per_round, list(fixed_choices(args.device)))
    report = render(args, cfg, table, calibration, load_line(load_before, os.getloadavg()))
    print(report)
    (out / "peer.md").write_text(report)
    per_round.to_csv(out / "peer_rounds.csv", index=False, float_format="%.4g")


if __name__ == "__main__":
    main()
