"""`finetune` command line: the one place that turns FinetuneError into exit code 2.

torch, torchvision and the plotting stack are imported inside the commands, after the
config is read and checked, so a typo in a config is reported in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config.load import load_config
from finetune.errors import FinetuneError, Interrupted
from finetune.parser import build_parser
from finetune.runs.rundir import owned_run_dir, resume_config

if TYPE_CHECKING:
    from finetune.runs.tracking import Link


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return COMMANDS[args.command](args)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"\nstopped by {exc}; resume with: {exc.resume_hint}", file=sys.stderr)
        return 128 + exc.signum


def cmd_train(args: argparse.Namespace) -> int:
    overrides = args.overrides + (["log.tensorboard=true"] if args.tensorboard else [])
    if args.resume and args.run_dir:
        raise FinetuneError("train: --resume continues a run in its own dir; drop --run-dir")
    if args.resume:
        cfg = resume_config(args.resume, overrides, args.config)
    elif args.config is None:
        raise FinetuneError("train: give a CONFIG file, or --resume RUN_DIR")
    else:
        cfg = load_config(args.config, overrides)
    from finetune.runtime import distributed
    from finetune.runtime.hardware import resolve_device
    from finetune.training.session import Session

    ranks = distributed.init(resolve_device(cfg.device).type)
    link = tracking_link(args.config) if cfg.tracking.mlflow else None
    try:
        with owned_run_dir(cfg, args.run_dir, args.resume, ranks) as run_dir:  # rank 0 holds it
            summary = Session(ranks).train(cfg, run_dir, resume=bool(args.resume), link=link)
    finally:
        distributed.close()
    if summary is None:
        return 0
    from finetune.runs.results import Judged

    best = "none" if summary["best_value"] is None else f"{summary['best_value']:.4f}"
    judged = "" if summary["judged"] is None else Judged(**summary["judged"]).describe(summary["monitor"]) + ", "
    print(
        f"done: best {summary['monitor']} {best} at epoch {summary['best_epoch']}, {judged}"
        f"final val_acc {summary['final_val_acc']:.4f}, {summary['total_seconds']:.1f}s; files in {run_dir}"
    )
    return 0


def tracking_link(config: str | None) -> Link:
    """A run's tags beyond its config (machine, the config folder's git commit) and log_model's exporter."""
    from finetune.inference.export import export_for_tracking
    from finetune.runs.tracking import Link, source_tags

    return Link(tags=source_tags(config), export=export_for_tracking)


def cmd_track(args: argparse.Namespace) -> int:
    """Send finished (or stopped) runs to MLflow: what the server lacks, never an epoch twice; a
    server that stops answering part-way is one line (what it lacks) and exit 2."""
    from finetune.inference.export import export_for_tracking
    from finetune.runs.tracking import track_run

    for run_dir in args.run_dirs:
        print(track_run(Path(run_dir), args.uri, args.experiment, export_for_tracking))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    import pandas as pd

    from finetune.plan import make_plan, plan_table, to_json

    plan = make_plan(cfg)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
        return 0
    batches = f" of {plan.accumulate_steps} batches each" if plan.accumulate_steps > 1 else ""
    print(f"{cfg.name}: {plan.train_size} train images, {plan.steps_per_epoch} optimizer steps per epoch{batches}")
    print(plan.runtime)
    print(pd.DataFrame(plan.groups).to_markdown(index=False))
    print()
    print(pd.DataFrame(plan_table(plan)).to_markdown(index=False))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Re-measure `auto`'s candidates on this machine; later runs of the config read the answer."""
    from finetune.plan import subject_of
    from finetune.runtime.resolve import calibrate_again

    cfg = load_config(args.config, args.overrides)
    subject = subject_of(cfg)
    print(calibrate_again(cfg, subject).note())
    return 0


def cmd_modules(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from finetune.modules import list_modules, render, to_json

    listing = list_modules(cfg, args.depth)
    print(json.dumps(to_json(listing), indent=2) if args.json else render(listing))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The config as a run's config.yaml holds it: `finetune train` takes it back unchanged."""
    from finetune.config.schema import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    if not 5 <= args.steps <= 1000:
        raise FinetuneError(f"lr-find --steps {args.steps}: give 5 to 1000 (100 is usual)")
    if not 0 < args.start_lr < args.end_lr:
        raise FinetuneError(f"lr-find --start-lr {args.start_lr:g} --end-lr {args.end_lr:g}: need 0 < start < end")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise FinetuneError("lr-find runs in one process; start it without torchrun")
    cfg = load_config(args.config, args.overrides)
    from finetune.lr_find import find_lr, save, set_line

    test = find_lr(cfg, args.stage, args.steps, args.start_lr, args.end_lr)
    default = f"lr_find-{cfg.name}" + (f"-{args.stage}" if args.stage else "")
    csv, png = save(test, Path(args.out) if args.out else Path(cfg.out_dir) / default)
    lr = test.suggestion
    use = set_line(cfg, test, lr, args.overrides) if lr is not None else None
    if args.json:
        fields = {"stage": test.stage, "ramped": test.joining, "suggestion": lr, "set": use, "steps": len(test.lrs)}
        files = {"csv": str(csv), "png": str(png)}
        print(json.dumps({**fields, "ended": test.ended, "seconds": test.seconds, **files}, indent=2))
        return 0
    n = test.epochs_before
    first = [
        f"epoch{'s 1-' if n > 1 else ' '}{n} trained first" if n else "",
        f"{test.cut} inputs cached" * bool(test.cut),
    ]
    setup = f" ({', '.join(filter(None, first))}: {test.setup_seconds:.1f} s)" if any(first) else ""
    print(f"lr-find: {len(test.lrs)} steps of stage {test.stage} in {test.seconds:.2f} s{setup}; {test.ended}")
    if lr is None:
        print(f"no suggestion: the loss never fell; lower --start-lr (was {args.start_lr:g}) or check the data")
    else:
        print(f"suggested lr for {test.stage}: {lr:.2g}, a tenth of where the loss bottoms out")
        if test.bottom == len(test.lrs) - 1:
            print(f"the loss still fell at the last lr: raise --end-lr (was {args.end_lr:g}) to see where it turns")
        print(f"use it: finetune train {args.config} {use}")
    print(f"wrote {csv} and {png}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise FinetuneError("sweep runs its runs in one process; under torchrun, use finetune train per config")
    from finetune.search.sweep import default_out, expand, run_sweep, write_comparison

    runs = expand(args.configs, args.overrides, args.grid, _seeds(args.seeds))
    out = Path(args.out) if args.out else default_out(args.configs, runs)
    print(f"sweep: {len(runs)} runs in {out}")
    if args.storage:
        from finetune.search.tune import require_optuna

        require_optuna()
        from finetune.search.storage import run_shared

        held = run_shared(runs, out, args.storage)
        runs = [r for r in runs if (out / r.name / "config.yaml").is_file()]  # other machines keep theirs
    else:
        held = run_sweep(runs, out)
    if held:
        print(
            f"sweep: {len(held)} runs still held by other processes ({', '.join(r.name for r in held)}); "
            f"whichever finishes the last run writes {out / 'comparison'}"
        )
        return 0
    table = write_comparison(runs, out)
    if table is None:
        print(f"sweep: every run finished; another sweep process is writing {out / 'comparison'}")
        return 0
    from finetune.runs.compare import markdown

    print(markdown(table))
    repeats = "seeds.csv/.md (with --seeds or a data.fold grid)"
    print(f"wrote {out}/comparison/: comparison.csv/.md, {repeats}, tradeoff.png, curves.png")
    return 0


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise FinetuneError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from finetune.search.tune import prepare, require_optuna

    opts = {k: getattr(args, k) for k in ("out", "storage", "study", "seed", "pruner")}
    tune = prepare(args.config, args.overrides, args.space, args.trials, opts)
    require_optuna()
    from finetune.runtime import distributed
    from finetune.runtime.hardware import resolve_device
    from finetune.search.report import finished, write_report
    from finetune.search.worker import run_worker

    ranks = distributed.init(resolve_device(tune.base_config.device).type)
    try:
        study = run_worker(tune, ranks)
    finally:
        distributed.close()
    if study is None:  # a rank other than 0
        return 0
    if not finished(study, tune.info.trials):
        print("tune: trials still running elsewhere; whichever worker finishes the last writes the report")
        return 0
    table = write_report(tune.study_dir, tune.info, study)
    if table is not None:
        from finetune.runs.compare import markdown

        print(markdown(table))
        print(f"wrote {tune.study_dir}: comparison/, best.yaml, importances.json, *.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """stdout holds the table (or the JSON) alone; notes and the files written go to stderr."""
    from finetune.runs.compare import compare, terminal_table

    if len(args.runs) == 1 and (Path(args.runs[0]) / "tune.json").is_file() and not args.html:  # --html: its trials
        return _compare_study(Path(args.runs[0]), args.json)
    out = Path(args.out)
    result = compare(args.runs, out, args.sort, html=args.html)
    print(json.dumps(result.to_json(), indent=2) if args.json else terminal_table(result.table))
    print(f"compare: tables and plots in {out}/" + (" with report.html" if args.html else ""), file=sys.stderr)
    return 0


def _compare_study(study_dir: Path, as_json: bool) -> int:
    """A study dir: its report (written into the study, as the worker that finished the last
    trial wrote it); its notes go to stderr, so stdout holds the table or the JSON alone."""
    import contextlib

    from finetune.runs.compare import terminal_table
    from finetune.search.tune import load_info, require_optuna

    require_optuna()
    from finetune.search.report import write_report

    with contextlib.redirect_stdout(sys.stderr):
        table = write_report(study_dir, load_info(study_dir))
    if table is None:
        raise FinetuneError(f"compare: a tune worker is writing {study_dir / 'comparison'} now; try again in a moment")
    print(table.to_json(orient="records", indent=2) if as_json else terminal_table(table))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import pandas as pd

    from finetune.inference.predict import evaluate_checkpoint

    out = Path(args.out) if args.out else None
    report = evaluate_checkpoint(args.checkpoint, args.overrides, out, args.tta, args.threshold)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if report.get("task") == "multilabel":
        return _print_label_report(report, args.tta)
    plain = report.get("without_tta")
    print(
        f"{report['images']} images: accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
        + (f" with {args.tta} TTA (without: accuracy {plain['accuracy']:.4f})" if plain else "")
    )
    per_class = pd.DataFrame(report["per_class"]).T
    print(per_class.to_markdown(floatfmt=".3f"))
    return 0


def _print_label_report(report: dict, tta: str | None) -> int:
    import pandas as pd

    plain = report.get("without_tta")
    print(
        f"{report['images']} images: mAP {report['map']:.4f}, micro F1 {report['f1_micro']:.4f}, macro F1 "
        f"{report['f1_macro']:.4f}, exact match {report['exact_match']:.4f}"
        + (f" with {tta} TTA (without: mAP {plain['map']:.4f})" if plain else "")
    )
    print(pd.DataFrame(report["per_class"]).T.to_markdown(floatfmt=".3f"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from finetune.inference.inspect import InspectOptions, inspect_checkpoint

    options = InspectOptions(Path(args.out) if args.out else None, args.top, args.layer, args.overrides)
    done = inspect_checkpoint(args.checkpoint, options)
    c = done.calibration
    temperature = (
        f"ECE {c.ece_before:.4f} -> {c.ece_after_fit:.4f} at temperature {c.temperature:.3f} "
        f"(held out: {c.ece_after_heldout:.4f})"
        if c.fitted
        else f"ECE {c.ece_before:.4f}, {c.fit}"
    )
    print(
        f"inspect: {done.images} images, {done.measure} {done.score:.4f}, Grad-CAM at {done.layer}; "
        f"{temperature}, kept in {done.temperature_file.name}"
    )
    print(f"wrote {done.out}/report.html and its files in {done.seconds:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from finetune.inference.export import export

    result = export(args.checkpoint, args.format, Path(args.out) if args.out else None, args.batch, args.overrides)
    print(
        f"wrote {result['file']} and {result['contract']}; on {result['images']} validation images its logits "
        f"are within {result['max_abs_diff']:.2g} of PyTorch's"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from finetune.inference.predict import predict

    results = predict(
        args.checkpoint, args.images, args.top_k, tta=args.tta, calibrated=args.calibrated, threshold=args.threshold
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = []
    for r in results:
        top = r.get("top", [])
        cells = {f"top{i + 1}": f"{t['class']} {t['probability']:.3f}" for i, t in enumerate(top)}
        if "labels" in r:  # multilabel: every label at or above its threshold
            cells = {"labels": ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["labels"]) or "-"}
        rows.append({"file": r["file"], **cells, **({"error": r["error"]} if "error" in r else {})})
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


COMMANDS = {
    "train": cmd_train,
    "plan": cmd_plan,
    "calibrate": cmd_calibrate,
    "modules": cmd_modules,
    "config": cmd_config,
    "lr-find": cmd_lr_find,
    "sweep": cmd_sweep,
    "tune": cmd_tune,
    "compare": cmd_compare,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "predict": cmd_predict,
    "track": cmd_track,
}


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
