"""The handlers of the commands that train a model and use what it learned: ``train``,
``cv``, ``lr-find``, ``eval``, ``predict`` (for every task: ``cnnlab segment train``, ...)
and ``demo``; each reads its ``TrainConfig`` flags or its run folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from cnnlab.cli.flags import EXPLICIT_NONE
from cnnlab.cli.output import print_json
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.tasks import TASKS
from cnnlab.tasks.options import options_for

DEFAULT_FOLDS = 5  # `cnnlab cv`'s K


def _print_report(report: dict, form: str, task: Any) -> None:
    """A training or evaluation report: JSON, or its task's headline."""
    from cnnlab.engine.distributed import is_main_process

    if not is_main_process():  # under torchrun every process returns the report; one prints
        return
    if form == "json":
        print_json(report)
    else:
        print("\n".join([task.headline(report), *task.details(report)]))


def _load(args: argparse.Namespace, task: str):
    """The run of an eval/predict command, refused (with the command to use) when it is
    another task's; options that change the loaded model (``--tta``) are applied here."""
    from cnnlab.runs import load_run

    at_load = {
        option.name: getattr(args, option.name)
        for option in options_for(TASKS[task].options, args.action)
        if option.at_load and getattr(args, option.name)
    }
    run = load_run(
        Path(args.run), device=args.device, backend=args.backend, compile=args.compile, **at_load
    )
    if run.task.name != task:
        right = TASKS[run.task.name].prefix()
        raise CnnlabError(
            f"{args.run} holds a {run.task.name} run; use `cnnlab {right}{args.action} {args.run}`"
        )
    return run


def _task_options(args: argparse.Namespace) -> dict:
    """The prediction options the user gave on an eval/predict command (the task's
    declaration made the flags; unset ones take the declared defaults in ``Run``)."""
    options = options_for(TASKS[args.task].options, args.action)
    return {
        option.name: getattr(args, option.name)
        for option in options
        if not option.at_load and getattr(args, option.name) is not None
    }


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig flags the user set (``--grad-clip none``: None)."""
    from cnnlab.config import TrainConfig

    names = {f.name for f in fields(TrainConfig) if f.metadata.get("cli", True)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return {k: None if v is EXPLICIT_NONE else v for k, v in given.items()}


def _refuse_on_resume(
    args: argparse.Namespace, what: str, kept: tuple[str, ...] = (), given: list[str] | None = None
) -> None:
    """A training flag given with ``--resume`` that the resumed run would not read (it
    continues with its own config.yaml; ``given``: the command's own such flags set):
    refused rather than silently dropped."""
    dropped = [name for name in _given_settings(args) if name not in kept] + (given or [])
    if dropped:
        flags = " ".join(f"--{name.replace('_', '-')}" for name in dropped)
        takes = ", ".join(f"--{name}" for name in kept)
        raise CnnlabError(
            f"{what} continues with its saved settings; {flags} would change nothing"
            + (f" (it takes {takes})" if takes else "")
        )


def _train_config(args: argparse.Namespace, extra: dict, task: str):
    """The TrainConfig of the flags the user set, over ``task``'s defaults."""
    from cnnlab.config import make_config

    given = _given_settings(args)
    data = getattr(args, "data", None)
    return make_config(task, data=str(data), out=str(args.out), model_args=extra, **given)


def cmd_train(args: argparse.Namespace, extra: dict) -> int:
    if args.resume and (extra or args.data or args.out):
        raise CnnlabError(
            "--resume RUN continues a run as it was; give no DIR, --out or model flags"
        )
    if not args.resume and not (args.data and args.out):
        raise CnnlabError(
            f"{TASKS[args.task].prefix()}train needs DIR and --out RUN (or --resume RUN)"
        )
    # Settings are checked before torch and the models are imported: a bad flag is
    # refused at once.
    cfg = None if args.resume else _train_config(args, extra, args.task)
    from cnnlab.checkpoint import read_model_json
    from cnnlab.engine.loop import RESUME_OVERRIDES
    from cnnlab.tasks import task_class
    from cnnlab.training import resume, train

    if args.resume:
        _refuse_on_resume(args, "--resume RUN", RESUME_OVERRIDES)
    task = read_model_json(args.resume).task if args.resume else args.task
    try:
        if args.resume:
            # `cnnlab train --resume` continues a run of any task; the task commands theirs.
            wanted = None if args.task == "classify" else args.task
            overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES}
            overrides = {k: v for k, v in overrides.items() if v is not EXPLICIT_NONE}
            report = resume(Path(args.resume), wanted, **overrides)
        else:
            report = train(cfg, task=task)
    except TrainingInterrupted as stop:
        from cnnlab.engine.distributed import is_main_process

        if stop.report is not None:
            _print_report(stop.report, args.format, task_class(task))
        if is_main_process():  # every process of a torchrun group stops; one says so
            print(
                f"{stop}; the report above is of the best weights. Continue with:"
                f" cnnlab {TASKS[task].prefix()}train --resume {stop.run_dir}",
                file=sys.stderr,
            )
        return 130
    _print_report(report, args.format, task_class(task))
    return 0


def cmd_cv(args: argparse.Namespace, extra: dict) -> int:
    if args.resume and (extra or args.data or args.out):
        raise CnnlabError("cv --resume OUT continues as it was; give no DIR, --out or model flags")
    if args.resume:
        _refuse_on_resume(args, "cv --resume OUT", given=["folds"] if args.folds else [])
    if not args.resume and not (args.data and args.out):
        raise CnnlabError("cv needs DIR and --out OUT (or --resume OUT)")
    cfg = None if args.resume else _train_config(args, extra, "classify")
    from cnnlab.cv import cross_validate, cv_table, resume_cv

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        summary = (
            resume_cv(args.resume, say)
            if args.resume
            else cross_validate(cfg, args.folds or DEFAULT_FOLDS, say)
        )
    except TrainingInterrupted as stop:
        out = args.resume or args.out
        print(f"{stop}; continue the folds with: cnnlab cv --resume {out}", file=sys.stderr)
        return 130
    if args.format == "json":
        print_json(summary)
    else:
        print(cv_table(summary))
        out = Path(args.resume or args.out)
        print(f"details: {out / 'cv.json'}, {out / 'confusion.png'}")
    return 0


def cmd_lr_find(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.config import default_of
    from cnnlab.lr_find import lr_find, png_path
    from cnnlab.plots import plot_lr_find
    from cnnlab.training import task_of_model

    out = png_path(args.out, args.overwrite, [Path(args.data)])
    args.out = "."  # the run folder TrainConfig asks for; lr-find writes none
    # A segmentation or detection model sweeps with its own task's defaults (no test split).
    task = task_of_model(args.model or default_of("classify", "model")).name
    cfg = _train_config(args, extra, task)
    result = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    plot_lr_find(result.lrs, result.losses, result.suggested_lr, out)
    if args.format == "json":
        print_json(result.to_dict())
    else:
        if result.stopped:
            print(result.stopped)
        print(f"suggested lr {result.suggested_lr:.2e}  (plot: {out})")
    return 0


def cmd_eval(args: argparse.Namespace, extra: dict) -> int:
    run = _load(args, args.task)
    report = run.evaluate(Path(args.dir) if args.dir else None, args.split, **_task_options(args))
    _print_report(report, args.format, run.task)
    return 0


def cmd_predict(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.destinations import check_destination, check_targets, output_stems
    from cnnlab.files import atomic_write_text

    run = _load(args, args.task)
    results, errors = run.predict_files([Path(p) for p in args.paths], **_task_options(args))
    folder = TASKS[args.task].predict_folder
    out = args.out or (_new_folder(folder) if folder else None)
    inputs = [Path(r["file"]) for r in results]
    # Every name is checked before anything is written: no input is ever replaced, an
    # existing file only with --overwrite, two inputs never share an output, and nothing
    # lands in a folder of images read or in the run's data (the next training would
    # take the drawings as images).
    data = [Path(p) for p in args.paths if Path(p).is_dir()]
    data += [root] if (root := run.data_folder()) is not None else []
    if args.save_csv is not None:
        check_targets([Path(args.save_csv)], inputs, args.overwrite, "--save-csv", data)
    drawn = out is not None and bool(results)
    if drawn:
        check_destination(Path(out), "--out", data)
        stems = output_stems(inputs, Path(out))
        targets = [f for path in inputs for f in run.output_files(stems[path]).values()]
        check_targets(targets, inputs, args.overwrite, "--out", data)
    created = drawn and not Path(out).exists()
    try:
        if drawn:
            for result, path in zip(results, inputs, strict=True):
                result.update(run.save(result, stems[path]))
        if args.save_csv is not None:
            Path(args.save_csv).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.save_csv, run.table(results))
    except BaseException:
        # A full disk or Ctrl-C/SIGTERM half-way: a folder this command made (so all of
        # it is its own) goes, rather than staying half-drawn.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    results = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    if args.format == "json":
        print_json(results)
    else:
        for result in results:
            print(f"{result['file']}: {run.task.describe(result)}")
    return 2 if errors else 0


def _new_folder(stem: str) -> Path:
    """./STEM, or STEM2, STEM3, ... when taken: outputs never go into an earlier folder."""
    candidate, number = Path(stem), 1
    while candidate.exists():
        number += 1
        candidate = Path(f"{stem}{number}")
    return candidate


def cmd_demo(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.demo import run_demo

    return run_demo(args.task, Path(args.out) if args.out else None, quiet=args.quiet)
