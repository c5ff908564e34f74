"""Benchmark `finetune train` against the seed notebook's training loop on the same data.

Runs the seed's three setups (feature extract, early unfreeze at 1, fine-tune from start)
with both, each in its own process (so peak RSS is per run), then measures the model's raw
train-step throughput for every numerics the device runs (precision x memory format) and the
memory of the full CIFAR-10 training set held in memory.

The raw rates give the ceiling the numerics allow: the best raw train rate over the rate of
the seed loop's numerics (fp32, contiguous), printed beside the measured speedup. finetune
runs with `auto` (decided by measuring, issue 16) from an empty calibration cache, so the
first run of each (model, trainable part) pays for measuring as a user's first run would;
`--choices` also runs every setup with each fixed precision and memory format, to show
`auto` beside every fixed choice for the run as a whole.

The `gradual_unfreeze` setup (configs/gradual_unfreeze.yaml, two epochs per stage: head,
layer4, layer3, everything) has no reference loop: it runs finetune with the feature cache
on and off, and shows seconds per stage epoch and the largest weight difference between the two.

    .venv/bin/python scripts/bench.py --arch mobilenet_v2 --size 128
    .venv/bin/python scripts/bench.py --arch resnet18 --size 224 --weights none --train 1000 --val 400
    .venv/bin/python scripts/bench.py --arch resnet18 --size 224 --weights none --train 500 --val 200 --choices
    .venv/bin/python scripts/bench.py --arch resnet18 --size 224 --weights none --train 1000 --val 400 \
        --setups gradual_unfreeze
    .venv/bin/python scripts/bench.py --arch resnet18 --weights none --size 32 --train 40 --val 20 --epochs 1 \
        --setups feature_extract --skip-memory --raw-steps 1     # a smoke test of this script

Prints a table and writes bench.md / bench.csv to --out. `--pruning` instead runs
scripts/bench_pruning.py: a tune study with and without pruning (issue 17). `--peer` instead runs
scripts/bench_peer.py: configs/bench_mobilenet_v2_128.yaml with auto (after `finetune calibrate`),
each fixed choice and the Lightning peer, scripts/bench_lightning.py (issue 24):

    .venv/bin/python scripts/bench.py --peer                  # 2 interleaved rounds; --rounds N for more
    .venv/bin/python scripts/bench.py --peer --quick          # a smoke test: 64 images, 32 px, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
SETUPS = {
    "feature_extract": {"freeze_backbone": True, "unfreeze_epoch": None},
    "early_unfreeze": {"freeze_backbone": True, "unfreeze_epoch": 1},
    "finetune_all": {"freeze_backbone": False, "unfreeze_epoch": None},
}
GRADUAL = "gradual_unfreeze"
GRADUAL_SETS = [  # the config's stages, two epochs each (a stage's cache pays off from its 2nd epoch); all run
    "train.epochs=8",
    "train.unfreeze=[{epoch: 2, modules: [layer4]}, {epoch: 4, modules: [layer3]}, {epoch: 6, modules: [backbone]}]",
    "train.early_stopping.patience=null",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--arch", default="mobilenet_v2", choices=["resnet18", "mobilenet_v2"])
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=800)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", help="cpu or cuda: every loop and the raw step run there")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=[*SETUPS, GRADUAL])
    p.add_argument("--choices", action="store_true", help="also run every setup with each fixed runtime choice")
    p.add_argument("--raw-steps", type=int, default=6, help="steps per timed block on CPU (50 on a GPU); median of 3")
    p.add_argument("--pruning", action="store_true", help="instead: what pruning saves in tune (bench_pruning.py)")
    p.add_argument("--peer", action="store_true", help="instead: auto, fixed choices, Lightning (bench_peer.py)")
    p.add_argument("--rounds", type=int, default=2, help="--peer: interleaved rounds, the fastest of each kept")
    p.add_argument("--quick", action="store_true", help="--peer: a smoke test (64 images, 32 px, 2 epochs)")
    p.add_argument("--skip-memory", action="store_true", help="skip holding all 50,000 CIFAR-10 images in memory")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--reference-run", help=argparse.SUPPRESS)  # internal: one reference setup
    p.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)  # internal
    return p.parse_args()


# ---- the reference: the seed notebook's loop, fp32, per-sample PIL transforms --------------
def reference_run(args: argparse.Namespace, setup: str) -> dict:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from finetune.config.schema import ModelConfig
    from finetune.data.sources import choose_subset
    from finetune.model.build import build_model

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    built = build_model(ModelConfig(arch=args.arch, weights=args.weights), 10)
    model, head_name = built.model.to(args.device), built.head_name
    tf = transforms.Compose(
        [
            transforms.Resize((args.size, args.size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(built.mean, built.std),
        ]
    )
    val_tf = transforms.Compose([transforms.Resize((args.size, args.size)), transforms.ToTensor(), tf.transforms[-1]])
    train_full = datasets.ImageFolder(f"{args.data}/train", tf)
    val_full = datasets.ImageFolder(f"{args.data}/test", val_tf)
    # the same stratified subsets finetune draws, so both train and score on the same images
    train_idx = choose_subset(torch.tensor(train_full.targets).numpy(), args.train, "stratified", args.seed)
    val_idx = choose_subset(torch.tensor(val_full.targets).numpy(), args.val, "stratified", args.seed + 1)
    trainloader = DataLoader(Subset(train_full, train_idx.tolist()), batch_size=32, shuffle=True)
    valloader = DataLoader(Subset(val_full, val_idx.tolist()), batch_size=64)

    cfg = SETUPS[setup]
    head = [p for n, p in model.named_parameters() if n.startswith(head_name + ".")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head_name + ".")]

    def make_opt() -> torch.optim.Optimizer:
        groups = [{"params": [p for p in backbone if p.requires_grad], "lr": 1e-4}] if backbone[0].requires_grad else []
        return torch.optim.Adam([*groups, {"params": head, "lr": 1e-3}])

    for p in backbone:
        p.requires_grad = not cfg["freeze_backbone"]
    opt = make_opt()
    crit = torch.nn.CrossEntropyLoss()
    epochs = []
    for ep in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for x, y in trainloader:
            opt.zero_grad()
            crit(model(x.to(args.device)), y.to(args.device)).backward()
            opt.step()
        if cfg["unfreeze_epoch"] is not None and ep == cfg["unfreeze_epoch"]:
            for p in model.parameters():
                p.requires_grad = True
            opt = make_opt()
        model.eval()
        correct = total = 0
        with torch.inference_mode():
            for x, y in valloader:
                correct += (model(x.to(args.device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        epochs.append({"epoch": ep, "epoch_seconds": time.perf_counter() - t0, "val_acc": correct / total})
        print(f"reference {setup} epoch {ep}: {epochs[-1]}", file=sys.stderr)
    return {"epochs": epochs, "seconds": time.perf_counter() - started}


# ---- running both tools in child processes -----------------------------------------------
def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MB) of that process alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def common_sets(args: argparse.Namespace, out_dir: Path) -> list[str]:
    return [
        "data.dataset=imagefolder",
        f"data.root={args.data}",
        f"data.train_size={args.train}",
        f"data.val_size={args.val}",
        f"data.image_size={args.size}",
        f"model.arch={args.arch}",
        f"model.weights={args.weights}",
        f"train.epochs={args.epochs}",
        f"seed={args.seed}",
        f"data.split_seed={args.seed}",  # the reference's subsets are drawn with --seed too
        f"device={args.device}",
        f"out_dir={out_dir}",
    ]


def finetune_run(args: argparse.Namespace, setup: str, out_dir: Path, extra: list[str] = (), name: str = "") -> dict:
    overrides = [*common_sets(args, out_dir), *_schedule_sets(SETUPS.get(setup)), *extra]
    run_dir = out_dir / (name or setup)
    finetune = [sys.executable, "-m", "finetune.cli", "train", f"configs/{setup}.yaml", "--run-dir", str(run_dir)]
    wall, rss = run_child([*finetune, "--set", *overrides])
    return {**run_result(run_dir), "wall": wall, "rss_mb": rss}


def run_result(run_dir: Path) -> dict:
    results = pd.read_csv(run_dir / "results.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = results[["epoch", "epoch_seconds", "val_acc", "stage"]].to_dict("records")
    choice = f"{summary['precision']} {summary['memory_format']}"
    return {"epochs": epochs, "choice": choice, "runtime": summary.get("runtime") or {}, "run_dir": run_dir}


def sweep_run(args: argparse.Namespace, setups: list[str], out_dir: Path, separate: dict) -> dict:
    """The same setups as one `finetune sweep` process; checks every run equals its separate twin."""
    sweep_dir = out_dir / "sweep"
    configs = [f"configs/{s}.yaml" for s in setups]
    cmd = [sys.executable, "-m", "finetune.cli", "sweep", *configs, "--out", str(sweep_dir)]
    wall, rss = run_child([*cmd, "--set", *common_sets(args, sweep_dir)])
    for setup in setups:
        ours = pd.read_csv(sweep_dir / setup / "results.csv").drop(columns="epoch_seconds")
        theirs = pd.read_csv(separate[setup]["run_dir"] / "results.csv").drop(columns="epoch_seconds")
        pd.testing.assert_frame_equal(ours, theirs, obj=f"{setup}: sweep vs separate process")
    return {"wall": wall, "rss_mb": rss, "runs": {s: run_result(sweep_dir / s) for s in setups}}


def _schedule_sets(cfg: dict | None) -> list[str]:
    if cfg is None:
        return []
    unfreeze = "null" if cfg["unfreeze_epoch"] is None else cfg["unfreeze_epoch"]
    return [f"train.freeze_backbone={str(cfg['freeze_backbone']).lower()}", f"train.unfreeze_epoch={unfreeze}"]


def gradual_comparison(args: argparse.Namespace, out_dir: Path) -> tuple[pd.DataFrame, float, dict]:
    """Seconds per stage with the feature cache on and off, and the largest weight difference."""
    runs = {}
    for cache in ("auto", "off"):
        sets = [*GRADUAL_SETS, f"train.feature_cache={cache}"]
        runs[cache] = finetune_run(args, GRADUAL, out_dir, sets, name=f"{GRADUAL}_{cache}")
    epochs = pd.concat([pd.DataFrame(r["epochs"]).assign(cache=cache) for cache, r in runs.items()])
    table = epochs.pivot_table(
        index="stage", columns="cache", values="epoch_seconds", aggfunc=["first", "last"], sort=False
    )
    table.columns = [f"s {'1st' if when == 'first' else '2nd'} epoch, cache {cache}" for when, cache in table.columns]
    table = table.reset_index()
    totals = {cache: (r["wall"], r["epochs"][-1]["val_acc"]) for cache, r in runs.items()}
    models = [torch.load(r["run_dir"] / "last.pt", weights_only=True)["model"] for r in runs.values()]
    diff = max((a.float() - models[1][k].float()).abs().max().item() for k, a in models[0].items())
    return table, diff, totals


def reference_child(args: argparse.Namespace, setup: str, out_dir: Path) -> dict:
    result_file = out_dir / f"reference_{setup}.json"
    cmd = [sys.executable, __file__, *sys.argv[1:], "--reference-run", setup, "--out", str(out_dir)]
    wall, rss = run_child(cmd)
    return {**json.loads(result_file.read_text()), "wall": wall, "rss_mb": rss}


def row(setup: str, tool: str, result: dict) -> dict:
    epochs = result["epochs"]
    later = [e["epoch_seconds"] for e in epochs[1:]]
    return {
        "setup": setup,
        "tool": tool,
        "s/epoch first": epochs[0]["epoch_seconds"],
        "s/epoch later": sum(later) / len(later) if later else float("nan"),
        "epochs s": sum(e["epoch_seconds"] for e in epochs),
        "total s": result["wall"],
        "final val acc": epochs[-1]["val_acc"],
        "best val acc": max(e["val_acc"] for e in epochs),
        "peak RSS MB": round(result["rss_mb"]),
    }


# ---- raw throughput and memory ----------------------------------------------------------
def raw_rates(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """img/s of the bare model for every numerics the device runs: a train step of the whole
    network (Adam included) and inference, at batch 32. Keyed by "precision memory_format"."""
    import torchvision

    from finetune.runtime.candidates import candidates
    from finetune.runtime.hardware import native_precisions
    from finetune.runtime.resolve import Runtime

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = torchvision.models.get_model(args.arch, num_classes=10).to(device)
    steps = args.raw_steps if device.type == "cpu" else 50
    rates = {}
    for c in candidates("auto", "auto", native_precisions(device)):
        runtime = Runtime(device, c.precision, c.memory_format)
        rates[c.label] = raw_throughput(model.to(memory_format=runtime.layout), runtime, args.size, steps)
        print(f"raw {c.label}: {rates[c.label]}", file=sys.stderr)
    return rates


def raw_throughput(model: torch.nn.Module, runtime, size: int, steps: int) -> dict[str, float]:
    """img/s of one numerics after a warm-up step: train step and inference."""
    device = runtime.device
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(32, 3, size, size, device=device).contiguous(memory_format=runtime.layout)
    y = torch.randint(0, 10, (32,), device=device)

    def step() -> None:
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode(), runtime.autocast(inference=True):
            model(x)

    def rate(fn: Callable[[], None]) -> float:
        """The median of three timed blocks: one block's rate moved by 10-20% between runs."""
        fn()  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        rates = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            rates.append(32 * steps / (time.perf_counter() - t0))
        return statistics.median(rates)

    model.train()
    train = rate(step)
    model.eval()
    return {"train": train, "eval": rate(infer)}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_run(args: argparse.Namespace, out_dir: Path) -> None:
    """RSS added by holding the whole CIFAR-10 training set (50,000 images) in memory."""
    from finetune.config.schema import DataConfig
    from finetune.data.sources import load_data

    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    data = load_data(DataConfig(dataset="imagefolder", root=args.data, train_size=None, val_size=800))
    result = {"images": len(data.train), "tensor_mb": data.train.images.nbytes / 2**20}
    result.update(
        {
            "load_seconds": time.perf_counter() - t0,
            "rss_added_mb": _rss_mb("VmRSS") - before,
            "peak_added_mb": _rss_mb("VmHWM") - before,
        }
    )
    (out_dir / "memory.json").write_text(json.dumps(result))


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.pruning:
        import bench_pruning

        bench_pruning.main(["--out", str(out_dir / "pruning")])
        return
    if args.peer:
        import bench_peer

        peer = ["--data", args.data, "--device", args.device, "--rounds", str(args.rounds)]
        bench_peer.main([*peer, "--out", str(out_dir / "peer"), *(["--quick"] if args.quick else [])])
        return
    torch.set_num_threads(os.cpu_count() or 1)
    if args.reference_run:
        result = reference_run(args, args.reference_run)
        (out_dir / f"reference_{args.reference_run}.json").write_text(json.dumps(result))
        return
    if args.memory_run:
        memory_run(args, out_dir)
        return
    calibration = out_dir / "calibration_cache"  # empty: auto pays for measuring as a first run does
    shutil.rmtree(calibration, ignore_errors=True)
    os.environ["FINETUNE_CACHE_DIR"] = str(calibration)

    if args.setups == [GRADUAL]:
        with tempfile.TemporaryDirectory(dir=out_dir) as runs:
            table, diff, totals = gradual_comparison(args, Path(runs))
        report = render_gradual(args, table, diff, totals)
        print(report)
        (out_dir / "bench_gradual.md").write_text(report)
        return
    rows, ours = [], {}
    setups = [s for s in args.setups if s != GRADUAL]
    with tempfile.TemporaryDirectory(dir=out_dir) as runs:
        for setup in setups:
            ours[setup] = finetune_run(args, setup, Path(runs))
            reference = reference_child(args, setup, out_dir)
            mine, theirs = row(setup, "finetune", ours[setup]), row(setup, "reference", reference)
            mine["speedup"] = theirs["total s"] / mine["total s"]
            rows += [theirs, mine]
        sweep = sweep_run(args, setups, Path(runs), ours)
        choices = fixed_choice_runs(args, setups, Path(runs)) if args.choices else None
    table = pd.DataFrame(rows)
    totals = table.groupby("tool")["total s"].sum()
    rates = raw_rates(args)
    memory = None
    if not args.skip_memory:
        run_child([sys.executable, __file__, *sys.argv[1:], "--memory-run", "--out", str(out_dir)])
        memory = json.loads((out_dir / "memory.json").read_text())
    report = render(args, table, totals, rates, ours, memory, sweep, choices)
    print(report)
    (out_dir / "bench.md").write_text(report)
    table.to_csv(out_dir / "bench.csv", index=False, float_format="%.4g")


def fixed_choice_runs(args: argparse.Namespace, setups: list[str], runs: Path) -> pd.DataFrame:
    """Whole-process seconds of every setup with auto and with each fixed (precision, memory
    format), each run in a folder of its own: a head-input cache left by an earlier run of the
    same numerics would make a later one look faster. auto reads its cached measurement, as any
    run after a (machine, model, size)'s first does."""
    from finetune.runtime.candidates import candidates
    from finetune.runtime.hardware import native_precisions

    rows = []
    for setup in setups:
        auto = finetune_run(args, setup, runs / f"{setup}-auto")
        row = {"setup": setup, "auto": auto["wall"], "auto chose": auto["choice"]}
        for c in candidates("auto", "auto", native_precisions(torch.device(args.device))):
            sets = [f"precision={c.precision}", f"train.memory_format={c.memory_format}"]
            row[c.label] = finetune_run(args, setup, runs / f"{setup}-{c.precision}-{c.memory_format}", sets)["wall"]
        rows.append(row)
    table = pd.DataFrame(rows)
    fixed = table.drop(columns=["setup", "auto", "auto chose"])
    table["auto / best fixed"] = table["auto"] / fixed.min(axis=1)
    return table


def trainer_rate(ours: dict, args: argparse.Namespace, raw: dict[str, float]) -> float:
    """Train img/s the trainer reached on unfrozen epochs, its evaluation (at the raw rate) taken out."""
    unfrozen = [e for r in ours.values() for e in r["epochs"] if e["stage"] == "backbone"]
    if not unfrozen:
        return float("nan")
    seconds = sum(e["epoch_seconds"] - args.val / raw["eval"] for e in unfrozen)
    return args.train * len(unfrozen) / seconds


def format_table(table: pd.DataFrame) -> str:
    """Markdown with 3 significant digits; the reference rows' empty speedup shown as `-`."""
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".3g", missingval="-")


def render(args, table, totals, rates, ours, memory, sweep, choices) -> str:
    chosen = next(iter(ours.values()))["choice"]
    raw = rates.get(chosen, {"train": float("nan"), "eval": float("nan")})
    achieved = trainer_rate(ours, args, raw)
    seed = rates["fp32 contiguous"]["train"]  # the seed loop's numerics
    best = max(rates, key=lambda label: rates[label]["train"])
    ceiling, speedup = rates[best]["train"] / seed, totals["reference"] / totals["finetune"]
    raw_table = pd.DataFrame(
        [{"numerics": label, "train img/s": r["train"], "inference img/s": r["eval"]} for label, r in rates.items()]
    )
    lines = [
        f"# finetune vs the seed's loop: {args.arch}, {args.size} px, weights {args.weights}, "
        f"{args.train} train / {args.val} val CIFAR-10 images, {args.epochs} epochs, {_where(args)}",
        "",
        format_table(table),
        "",
        f"- total over {len(args.setups)} setups: reference {totals['reference']:.0f} s, "
        f"finetune {totals['finetune']:.0f} s, speedup {totals['reference'] / totals['finetune']:.2f}x",
        f"- the same setups as one `finetune sweep` process: {sweep['wall']:.0f} s (peak RSS {sweep['rss_mb']:.0f} MB) "
        f"against {totals['finetune']:.0f} s as separate processes, {totals['reference'] / sweep['wall']:.2f}x the "
        "reference; every run's results.csv equal to its separate twin's but for timing",
        f"- auto chose: {', '.join(_auto_choice(setup, result) for setup, result in ours.items())}",
        f"- raw model at {chosen}: train step {raw['train']:.1f} img/s, inference {raw['eval']:.1f} img/s; "
        f"trainer on unfrozen epochs {achieved:.1f} img/s ({achieved / raw['train']:.0%} of raw)",
        f"- ceiling the raw step rates allow: {best} {rates[best]['train']:.1f} img/s over the seed loop's fp32 "
        f"contiguous {seed:.1f} = {ceiling:.2f}x; measured speedup {speedup:.2f}x ({speedup / ceiling:.0%} of it)",
        "",
        "Raw model, batch 32, every numerics the device runs:",
        "",
        format_table(raw_table),
    ]
    if choices is not None:
        fixed = choices.drop(columns=["setup", "auto", "auto chose", "auto / best fixed"]).sum()
        total = choices["auto"].sum() / fixed.min()
        lines += ["", "Whole-process seconds per setup, auto beside every fixed choice:", "", format_table(choices)]
        lines += ["", f"- over all setups auto takes {total:.2f}x the best single fixed choice ({fixed.idxmin()})"]
    if memory is not None:
        lines += [
            f"- full CIFAR-10 training set in memory: {memory['images']} images, {memory['tensor_mb']:.0f} MB tensor, "
            f"{memory['rss_added_mb']:.0f} MB RSS added after loading ({memory['peak_added_mb']:.0f} MB at the peak), "
            f"decoded in {memory['load_seconds']:.1f} s",
        ]
    return "\n".join(lines) + "\n"


def _auto_choice(setup: str, result: dict) -> str:
    """The setup's choice and how it was decided, from summary.json's runtime record where it has one."""
    runtime, how = result["runtime"], ""
    calibration = runtime.get("calibration")
    if calibration and calibration.get("short_run"):
        how = f" (a short run: probed in {calibration['seconds']:.1f} s, not measured)"
    elif calibration:
        how = f" ({runtime['decided_by']} in {calibration['seconds']:.1f} s)"
    elif runtime:
        how = f" ({runtime['decided_by']})"
    return f"{setup} {result['choice']}{how}"


def _where(args: argparse.Namespace) -> str:
    """The machine, as the calibration cache names it: chip, the flags that matter, threads."""
    from finetune.runtime.hardware import device_name

    return f"{device_name(torch.device(args.device))}, {os.cpu_count()} CPU cores"


def render_gradual(args: argparse.Namespace, table: pd.DataFrame, diff: float, totals: dict) -> str:
    lines = [
        f"# {GRADUAL}: {args.arch}, {args.size} px, weights {args.weights}, {args.train} train / {args.val} val "
        f"CIFAR-10 images, two epochs per stage, {os.cpu_count()} CPU cores",
        "",
        format_table(table),
        "",
        *(f"- cache {c}: {wall:.0f} s in all, final val acc {acc:.3f}" for c, (wall, acc) in totals.items()),
        f"- largest absolute weight difference between the cached and uncached runs' last.pt: {diff:.3g}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
