"""The command line's grammar: every `finetune` command and flag (cli.py runs them; the CLI
reference in docs/ is generated from this parser)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained image classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    add_overrides(train)
    train.add_argument("--run-dir", help="write the run here instead of <out_dir>/<name>")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last.pt")
    train.add_argument("--tensorboard", action="store_true", help="also log to <run dir>/tensorboard")

    plan = config_command(sub, "plan", help="print a config's schedule epoch by epoch, without training")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    config_command(sub, "calibrate", help="measure the runtime choices for a config again and keep the answer")

    mods = config_command(sub, "modules", help="the model's module tree: parameters, groups, the names a stage takes")
    mods.add_argument("--depth", type=int, help="levels to show (default: 2, and the blocks of block lists below)")
    mods.add_argument("--json", action="store_true", help="print JSON instead of a table")

    config_command(sub, "config", help="print the fully resolved config (every default) as YAML")

    find = config_command(sub, "lr-find", help="an LR range test for one stage: suggests its LR, changes no run")
    find.add_argument("--stage", help="the stage whose groups ramp (default: the first, the head)")
    find.add_argument("--out", help="where lr_find.csv/.png go (default: <out_dir>/lr_find-<name>[-<stage>])")
    find.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (default 100)")
    find.add_argument("--start-lr", type=float, default=1e-7, help="the ramp's first LR (default 1e-7)")
    find.add_argument("--end-lr", type=float, default=10.0, help="the ramp's last LR (default 10)")
    find.add_argument("--json", action="store_true", help="print the result as JSON")

    sweep = sub.add_parser("sweep", help="train several configs or a grid in one process, then compare them")
    sweep.add_argument("configs", nargs="+", help="one YAML config (with --grid/--seeds) or several")
    add_overrides(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="one run per value")
    sweep.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: every setting once per seed")
    sweep.add_argument("--out", help="sweep dir (default: <out_dir>/sweep-<first run>)")
    sweep.add_argument("--storage", help="RDB URL: deal the runs to workers on several machines (Optuna)")

    tune = sub.add_parser("tune", help="search a config's keys with Optuna, pruning bad trials early")
    tune.add_argument("config")
    tune.add_argument("--space", required=True, help="YAML: dotted keys -> {low, high, log} or {choices: [...]}")
    tune.add_argument("--trials", type=int, required=True, help="the study's total, over all workers")
    add_overrides(tune)
    tune.add_argument("--out", help="study dir (default: <out_dir>/tune-<name>)")
    tune.add_argument("--storage", help="RDB URL shared by workers (default: a journal file in the study dir)")
    tune.add_argument("--study", help="study name (default: the config's name)")
    tune.add_argument("--seed", type=int, help="sampler seed (default: the config's seed)")
    tune.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")

    compare = sub.add_parser("compare", help="compare runs: table, curves.png, per_class.png")
    compare.add_argument("runs", nargs="+", help="run dirs, globs, or folders with runs at any depth (sweeps, studies)")
    compare.add_argument("--out", default="comparison", help="where to write tables and plots")
    compare.add_argument(
        "--sort",
        default="judged_val_acc",
        help="column to sort by (judged_val_acc: val_acc at the epoch checkpoint.judge picks)",
    )
    compare.add_argument("--json", action="store_true", help="print JSON (runs, and seeds/folds) instead of a table")
    compare.add_argument("--html", action="store_true", help="also write report.html: one self-contained page")

    evaluate = sub.add_parser("eval", help="score a checkpoint: metrics, per-class report, confusion matrix")
    evaluate.add_argument("checkpoint", help="best.pt / last.pt, or a run dir (its best.pt)")
    add_overrides(evaluate, "data.KEY=VALUE")
    evaluate.add_argument("--out", help="output dir (default: eval-<checkpoint name> beside the checkpoint)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    add_tta(evaluate)
    add_threshold(evaluate)

    insp = sub.add_parser(
        "inspect", help="what a checkpoint gets wrong: top losses with Grad-CAM, confusions, calibration"
    )
    insp.add_argument("checkpoint", help="best.pt / last.pt, or a run dir (its best.pt)")
    add_overrides(insp, "data.KEY=VALUE")
    insp.add_argument("--out", help="output dir (default: inspect-<checkpoint name> beside the checkpoint)")
    insp.add_argument(
        "--top", type=int, default=9, help="images in top_losses.png and top_correct.png, 1 to 100 (default 9)"
    )
    insp.add_argument("--layer", help="the module Grad-CAM reads (default: the architecture's last feature map)")

    exp = sub.add_parser("export", help="a checkpoint as ONNX or TorchScript, checked against PyTorch")
    exp.add_argument("checkpoint", help="best.pt / last.pt, or a run dir (its best.pt)")
    exp.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    exp.add_argument("--out", help="file to write (default: beside the checkpoint)")
    exp.add_argument("--batch", default="dynamic", help="dynamic (default) or a fixed batch size")
    add_overrides(exp, "data.KEY=VALUE")

    pred = sub.add_parser("predict", help="top-k classes for image files")
    pred.add_argument("checkpoint", help="best.pt / last.pt, a run dir (its best.pt), or a file from finetune export")
    pred.add_argument("images", nargs="+", help="image files or folders")
    pred.add_argument("--top-k", type=int, default=3)
    pred.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pred.add_argument(
        "--calibrated", action="store_true", help="probabilities at the temperature finetune inspect fitted"
    )
    add_tta(pred)
    add_threshold(pred)

    track = sub.add_parser("track", help="send runs to MLflow: what the server lacks of them (tracking.mlflow)")
    track.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs, finished or stopped")
    track.add_argument("--uri", help="tracking server (default: the run's tracking.mlflow.uri, or MLFLOW_TRACKING_URI)")
    track.add_argument("--experiment", help="experiment of a run not tracked before (default: the run's name)")
    return parser


def config_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A command that reads a CONFIG and takes `--set KEY=VALUE` overrides."""
    command = sub.add_parser(name, help=help)
    command.add_argument("config")
    add_overrides(command)
    return command


def add_overrides(command: argparse.ArgumentParser, metavar: str = "KEY=VALUE") -> None:
    command.add_argument("--set", dest="overrides", action="extend", default=[], nargs="+", metavar=metavar)


def add_tta(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        choices=["flip", "crops"],
        help="average logits over the image and its mirror (flip, the default), or ten crops and mirrors (crops)",
    )


def add_threshold(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="multilabel: predict a label at probability T or above, for every label (default: the checkpoint's own)",
    )


def package_version() -> str:
    """The installed distribution's version; a source tree that is not installed has its own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune")
    except PackageNotFoundError:
        from finetune import __version__

        return __version__
