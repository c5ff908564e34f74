"""`finetune` command line: the one place that turns FinetuneError into exit code 2.

torch, torchvision and the plotting stack are imported inside the commands, after the
config is read and checked, so a typo in a config is reported in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config import Config, load_config
from finetune.errors import FinetuneError, Interrupted
from finetune.rundir import create_run_dir, new_run_dir, remove_stale_temp_files, resume_config

if TYPE_CHECKING:
    from finetune.train import Trainer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return args.func(args)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"\nstopped by {exc}; resume with: finetune train --resume {exc.run_dir}", file=sys.stderr)
        return 128 + exc.signum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained image classifiers.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="fine-tune a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    train.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE")
    train.add_argument("--run-dir", help="write the run here instead of <out_dir>/<name>")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last.pt")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print a config's schedule epoch by epoch, without training")
    plan.add_argument("config")
    plan.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=cmd_plan)

    compare = sub.add_parser("compare", help="compare runs: table, curves.png, per_class.png")
    compare.add_argument("runs", nargs="+", help="run dirs, globs, or folders of runs")
    compare.add_argument("--out", default="comparison", help="where to write tables and plots")
    compare.add_argument("--sort", default="best_val_acc", help="column to sort by")
    compare.set_defaults(func=cmd_compare)

    evaluate = sub.add_parser("eval", help="score a checkpoint: metrics, per-class report, confusion matrix")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="data.KEY=VALUE")
    evaluate.add_argument("--out", help="output dir (default: eval-<checkpoint name> beside the checkpoint)")
    evaluate.set_defaults(func=cmd_eval)

    pred = sub.add_parser("predict", help="top-k classes for image files")
    pred.add_argument("checkpoint")
    pred.add_argument("images", nargs="+", help="image files or folders")
    pred.add_argument("--top-k", type=int, default=3)
    pred.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pred.set_defaults(func=cmd_predict)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    overrides = [item for group in args.overrides for item in group]
    if args.resume and args.run_dir:
        raise FinetuneError("train: --resume continues a run in its own dir; drop --run-dir")
    if args.resume:
        cfg = resume_config(args.resume, overrides, args.config)
        run_dir = Path(args.resume)
        remove_stale_temp_files(run_dir)
    elif args.config is None:
        raise FinetuneError("train: give a CONFIG file, or --resume RUN_DIR")
    else:
        cfg = load_config(args.config, overrides)
        run_dir = new_run_dir(cfg, args.run_dir)
    state = _resume_state(run_dir) if args.resume else None
    trainer = _prepare(cfg, run_dir)
    if state is not None:
        trainer.restore(state)
        print(f"resuming {run_dir} after epoch {trainer.progress.epoch}, step {trainer.progress.step}")
        _say_if_schedule_stretched(state["config"]["train"]["epochs"], cfg)
    stopped = trainer.stopping.report()
    if stopped is not None:
        print(f"{run_dir} is complete: stopped early at epoch {stopped['epoch']} ({stopped['reason']})")
        return 0
    if trainer.progress.epoch >= cfg.train.epochs:
        print(f"{run_dir} already finished {cfg.train.epochs} epochs; raise --set train.epochs=N to train longer")
        return 0
    summary = trainer.fit()
    best = "none" if summary["best_value"] is None else f"{summary['best_value']:.4f}"
    print(
        f"done: best {summary['monitor']} {best} at epoch {summary['best_epoch']}, "
        f"final val_acc {summary['final_val_acc']:.4f}, {summary['total_seconds']:.1f}s; files in {run_dir}"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [item for group in args.overrides for item in group])
    import pandas as pd

    from finetune.plan import make_plan, plan_table, to_json

    plan = make_plan(cfg)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
        return 0
    print(f"{cfg.name}: {plan.train_size} train images, {plan.steps_per_epoch} steps per epoch")
    print(pd.DataFrame(plan.groups).to_markdown(index=False))
    print()
    print(pd.DataFrame(plan_table(plan)).to_markdown(index=False))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from finetune.compare import compare, markdown

    out = Path(args.out)
    table = compare(args.runs, out, args.sort)
    print(markdown(table))
    print(f"wrote {out}/comparison.csv, comparison.md, per_class.csv, curves.png, per_class.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import pandas as pd

    from finetune.inference import evaluate_checkpoint

    overrides = [item for group in args.overrides for item in group]
    report = evaluate_checkpoint(args.checkpoint, overrides, Path(args.out) if args.out else None)
    print(
        f"{report['images']} images: accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
    )
    per_class = pd.DataFrame(report["per_class"]).T
    print(per_class.to_markdown(floatfmt=".3f"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from finetune.inference import predict

    results = predict(args.checkpoint, args.images, args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = []
    for r in results:
        top = r.get("top", [])
        cells = {f"top{i + 1}": f"{t['class']} {t['probability']:.3f}" for i, t in enumerate(top)}
        rows.append({"file": r["file"], **cells, **({"error": r["error"]} if "error" in r else {})})
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def _resume_state(run_dir: Path) -> dict | None:
    """last.pt of the run, or None when it was stopped before its first checkpoint."""
    from finetune.checkpoint import load_checkpoint

    last = run_dir / "last.pt"
    if not last.exists():
        print(f"{run_dir} has no last.pt yet: starting it from the beginning with its saved config")
        return None
    state = load_checkpoint(last)
    if "progress" not in state:
        raise FinetuneError(f"--resume: {last} holds no training state; it cannot be resumed")
    return state


def _say_if_schedule_stretched(saved_epochs: int, cfg: Config) -> None:
    """Raising train.epochs re-plans a decaying schedule over the new length (README: Schedules)."""
    name = cfg.train.scheduler.name
    if cfg.train.epochs > saved_epochs and name in ("cosine", "linear", "onecycle"):
        print(
            f"train.epochs raised from {saved_epochs} to {cfg.train.epochs}: the {name} schedule now spans "
            f"{cfg.train.epochs} epochs, so the LR continues from this step along the longer curve"
        )


def _prepare(cfg: Config, run_dir: Path) -> Trainer:
    """Validate what is cheap to check, then load data and weights, then write the run dir."""
    import torch

    from finetune.data import load_data
    from finetune.hardware import resolve_runtime
    from finetune.models import build_model, check_model_config, skeleton
    from finetune.schedule import check_stages
    from finetune.train import Trainer

    check_model_config(cfg.model)
    if cfg.train.unfreeze is not None:  # stage names against the arch, before any data loads
        bare = skeleton(cfg.model, num_classes=2)
        check_stages(cfg.train, bare.model, bare.head_name)
    runtime = resolve_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed)
    built = build_model(cfg.model, data.num_classes)
    print(
        f"{cfg.name}: {cfg.model.arch} on {len(data.train)} train / {len(data.val)} val images, "
        f"{data.num_classes} classes, {runtime.describe()}, run dir {run_dir}"
    )
    trainer = Trainer(cfg, data, built, runtime, run_dir)
    create_run_dir(run_dir, cfg)
    return trainer


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
