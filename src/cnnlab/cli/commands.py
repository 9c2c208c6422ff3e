"""The command handlers: each calls the Python API and prints its result (one JSON
document with ``--format json``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from cnnlab.cli.flags import EXPLICIT_NONE
from cnnlab.errors import CnnlabError, TrainingInterrupted
from cnnlab.tasks import TASKS
from cnnlab.tasks.options import options_for


def print_json(document: object) -> None:
    """``document`` as one JSON document on stdout; a NaN or infinity (NaN weights, a
    diverged loss) is printed as null, with a warning on stderr, since JSON has neither."""
    from cnnlab.files import json_text

    text, replaced = json_text(document)
    sys.stdout.write(text + "\n")
    if replaced:
        print(
            f"warning: {replaced} value(s) were NaN or infinite and are printed as null",
            file=sys.stderr,
        )


def _console(wide: bool = False):  # rich is imported lazily so `cnnlab --help` starts fast
    """The terminal, at its width; piped output at $COLUMNS, else 80 (rich's rule).
    ``wide`` (``--wide``): no limit, every column shown, lines as long as they need."""
    from rich.console import Console

    return Console(width=_UNLIMITED) if wide else Console()


_UNLIMITED = 10_000


def _width(console) -> int | None:
    return None if console.width >= _UNLIMITED else console.width


def _print_table(fitted, console) -> None:
    """A ``tables.FittedTable``, and under it the line naming the columns it left out."""
    console.print(fitted.table)
    if fitted.hidden:
        console.print(fitted.hidden_line(), style="dim")


def _kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CnnlabError(f"--kwargs {text!r}: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise CnnlabError(f"--kwargs {text!r}: expected a JSON object of keyword arguments")
    return value


def parse_input(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise CnnlabError(
            f"--input {text!r}: expected C,H,W as three positive integers (3,224,224)"
        )
    return dims  # type: ignore[return-value]


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


def cmd_models(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import models_table
    from cnnlab.inspect.cache import cached_model_table_rows

    rows = cached_model_table_rows(args.pattern)
    if args.format == "json":
        print_json(rows)
    else:
        console = _console(args.wide)
        _print_table(models_table(rows, _width(console)), console)
    return 0


def cmd_summary(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import render_summary
    from cnnlab.inspect.specs import summarize_spec

    if args.erf:
        return _summary_erf(args, extra)
    size = parse_input(args.input) if args.input else None
    limit = _memory_limit(args.max_memory)
    kwargs = {**_kwargs(args.kwargs), **extra}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model, summary, size = summarize_spec(args.model, kwargs, size, depth=args.depth)
    if args.strict and summary.not_counted:
        named = ", ".join(f"{op} ({n}x)" for op, n in summary.not_counted.items())
        raise CnnlabError(f"{args.model}: FLOPs not counted for {named} (--strict)")
    fit = None
    if args.batch is not None or args.max_memory is not None:
        from cnnlab.inspect.memory import estimate_memory, max_batch_size
        from cnnlab.inspect.summary import with_memory

        def estimate_at(batch: int):
            return estimate_memory(model, size, batch, args.optimizer)

        if limit is not None:
            fit = max_batch_size(estimate_at, limit)
        batch = args.batch or (fit[0] if fit and fit[0] else 1)
        with_memory(summary, estimate_at(batch), train=args.train or limit is not None)
    document = summary.to_dict(args.model)
    if fit is not None:
        document["max_memory"] = {"limit_bytes": limit, "max_batch": fit[0]}
        if fit[1] is not None:
            document["max_memory"]["training_step"] = fit[1].training_step
    if args.format == "json":
        print_json(document)
        return 0
    console = _console(args.wide)
    title = f"{args.model} at {'x'.join(map(str, size))}"
    console.print(render_summary(summary, title, _width(console), wide=args.wide or None))
    if fit is not None:
        print(_fit_line(args.max_memory, args.optimizer, document["max_memory"]))
    return 0


def _summary_erf(args: argparse.Namespace, extra: dict) -> int:
    """``summary MODEL --erf`` (fresh weights) or ``summary RUN --erf`` (trained ones)."""
    from cnnlab.explain_plots import plot_erf
    from cnnlab.inspect.erf import effective_fields, erf_table

    size = parse_input(args.input) if args.input else None
    if (Path(args.model) / "model.json").is_file():
        from cnnlab.runs import load_run

        run = load_run(args.model, "cpu", fast=False)
        model, what = run.model, f"{args.model} (trained weights)"
        size = size or (run.task.in_channels, run.task.img_size, run.task.img_size)
    else:
        from cnnlab.inspect.specs import build_model

        kwargs = {**_kwargs(args.kwargs), **extra}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model, size = build_model(args.model, kwargs, size)  # real weights: gradients flow
        what = f"{args.model} (fresh weights)"
    fields = effective_fields(model, size)
    plot_erf(fields, f"{what} at {'x'.join(map(str, size))}", Path(args.erf_out))
    if args.format == "json":
        print_json(
            {
                "model": args.model,
                "input": list(size),
                "stages": [f.to_dict() for f in fields],
                "drawing": args.erf_out,
            }
        )
    else:
        print(f"{what} at {'x'.join(map(str, size))}")
        print(erf_table(fields))
        print(f"drawn to {args.erf_out}")
    return 0


def _memory_limit(text: str | None) -> int | None:
    if text is None:
        return None
    from cnnlab.inspect.memory import parse_bytes

    return parse_bytes(text)


def _fit_line(text: str, optimizer: str, fit: dict) -> str:
    if not fit["max_batch"]:
        return f"Max batch in {text}:     none: one sample's training step does not fit"
    return (
        f"Max batch in {text}:     {fit['max_batch']:,} (training step"
        f" {fit['training_step'] / 1e6:,.2f} MB with {optimizer})"
    )


def cmd_compare(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect.compare import compare, compare_table

    size = parse_input(args.input) if args.input else None
    if args.plot:
        from cnnlab.files import check_targets

        check_targets([Path(args.plot)], [], args.overwrite, "--plot")
    rows = compare(args.models, size, _kwargs(args.kwargs), batch=args.batch)
    if args.plot:
        from cnnlab.plots import plot_compare

        plot_compare(rows, Path(args.plot))
    if args.format == "json":
        print_json(rows)
    else:
        console = _console(args.wide)
        _print_table(compare_table(rows, _width(console)), console)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def cmd_data(args: argparse.Namespace, extra: dict) -> int:
    if args.data_command == "digits":
        from cnnlab.data.digits import write_digits

        counts = write_digits(Path(args.dst), size=args.size)
        print(f"wrote {sum(counts.values())} digit images ({len(counts)} classes) to {args.dst}")
    elif args.data_command == "shapes":
        from cnnlab.data.shapes import write_shapes

        write_shapes(Path(args.dst), task=args.task, n=args.n, size=args.size, seed=args.seed)
        print(f"wrote {args.n} {args.size}x{args.size} shape images for {args.task} to {args.dst}")
    elif args.data_command == "convert":
        from cnnlab.data.convert import convert_detection

        report = convert_detection(Path(args.src), Path(args.dst), args.to)
        if args.format == "json":
            print_json(report)
        else:
            print(
                f"wrote {args.src} ({report['from']}) to {args.dst} as {report['to']}:"
                f" {report['images']} images, {report['boxes']} boxes,"
                f" {len(report['classes'])} classes"
            )
    elif args.data_command == "check":
        from cnnlab.data.check import check_folder, summarize_check

        report = check_folder(Path(args.dir), _images(args))
        if args.format == "json":
            print_json(report)
        else:
            print(summarize_check(report))
    else:
        from cnnlab.data.check import clean_folder, clean_reasons

        report = clean_folder(
            Path(args.src), Path(args.dst), strip_prefix=args.strip_prefix, images=_images(args)
        )
        if args.format == "json":
            print_json(report)
        else:
            print(f"cleaned {args.src} into {args.dst}: {len(report['copied'])} files copied")
            reasons = clean_reasons(report)
            if reasons:
                print(f"{len(report['left_out'])} files left out: {reasons}")
            print(f"details: {Path(args.dst) / 'clean_report.json'}")
    return 0


def _images(args: argparse.Namespace) -> Path | None:
    return Path(args.images) if args.images else None


def _train_config(args: argparse.Namespace, extra: dict, task: str):
    """The TrainConfig of the flags the user set, over ``task``'s defaults."""
    from cnnlab.config import TrainConfig, make_config

    names = {f.name for f in fields(TrainConfig) if f.metadata.get("cli", True)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    given = {k: None if v is EXPLICIT_NONE else v for k, v in given.items()}
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
        if stop.report is not None:
            _print_report(stop.report, args.format, task_class(task))
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
    if not args.resume and not (args.data and args.out):
        raise CnnlabError("cv needs DIR and --out OUT (or --resume OUT)")
    cfg = None if args.resume else _train_config(args, extra, "classify")
    from cnnlab.cv import cross_validate, cv_table, resume_cv

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        summary = (
            resume_cv(args.resume, say) if args.resume else cross_validate(cfg, args.folds, say)
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
    from cnnlab.lr_find import lr_find, png_path
    from cnnlab.plots import plot_lr_find

    out = png_path(args.out, args.overwrite, [Path(args.data)])
    args.out = "."  # the run folder TrainConfig asks for; lr-find writes none
    cfg = _train_config(args, extra, "classify")
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
    from cnnlab.files import atomic_write_text, check_destination, check_targets, output_stems

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


def cmd_proposals(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.data.proposals import ProposalSource, proposal_report

    source = ProposalSource(args.mode, args.max, args.file, args.workers)
    report = proposal_report(Path(args.data), source)
    if args.format == "json":
        print_json(report)
    else:

        def shown(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        print(
            f"{report['n_images']} images: {report['boxes_per_image']:.1f} boxes/image,"
            f" recall@0.5 {shown(report['recall50'])}, recall@0.7 {shown(report['recall70'])},"
            f" {report['seconds_per_image']:.3f} s/image ({report['source']})"
        )
    return 0


def _new_folder(stem: str) -> Path:
    """./STEM, or STEM2, STEM3, ... when taken: outputs never go into an earlier folder."""
    candidate, number = Path(stem), 1
    while candidate.exists():
        number += 1
        candidate = Path(f"{stem}{number}")
    return candidate


def cmd_export(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.export import FORMATS, describe, export_run

    to, form = args.to, args.format
    if form in FORMATS:  # the flag before --to: still read, with a line saying so
        print(f"note: --format {form} is now --to {form} (--format: text or json)", file=sys.stderr)
        to, form = to or form, "text"
    elif form not in ("text", "json"):
        raise CnnlabError(f"--format {form}: expected text or json (the file's format: --to)")
    if args.json:
        print("note: --json is now --format json", file=sys.stderr)
        form = "json"
    if args.images < 1:
        raise CnnlabError(f"--images must be at least 1, got {args.images}")
    record = export_run(
        Path(args.run),
        to,
        args.out,
        args.opset,
        args.dynamic_batch,
        args.images,
        args.overwrite,
        int8=args.int8,
        calibration=args.calibration,
        max_drop=args.max_drop,
    )
    if form == "json":
        print_json(record)
    else:
        print(describe(record))
    return 0


def cmd_benchmark(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.export.benchmark import benchmark_run, describe

    def say(line: str) -> None:
        print(f"{line}...", file=sys.stderr, flush=True)

    table = benchmark_run(
        Path(args.run), args.formats, args.batch, args.threads, args.images, args.save, say
    )
    if args.format == "json":
        print_json(table)
    else:
        print(describe(table))
    return 0


def cmd_demo(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.demo import run_demo

    return run_demo(args.task, Path(args.out) if args.out else None, quiet=args.quiet)


def cmd_heatmap(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.heatmap import heatmap

    result = heatmap(
        Path(args.run), Path(args.image), args.class_name, args.out, args.device, args.overwrite
    )
    if args.format == "json":
        print_json(result)
    else:
        print(heatmap_line(result, args.out))
        print(f"each cell: {result['cells']}")
        if result["warning"]:
            print(f"warning: {result['warning']}", file=sys.stderr)
    return 0


def cmd_explain(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.attribution import METHODS
    from cnnlab.explain.audit import audit_run, audit_table
    from cnnlab.explain.predictions import explain_files

    if args.audit:
        methods = (args.method,) if args.method else METHODS
        report = audit_run(
            args.run,
            args.paths,
            args.images,
            methods,
            args.layer,
            args.device,
            args.score_threshold,
        )
        if args.format == "json":
            print_json(report)
        else:
            print(audit_table(report))
        return 0
    if not args.paths:
        raise CnnlabError("explain needs at least one IMAGE (or --audit)")
    documents = explain_files(
        args.run,
        args.paths,
        args.method or "gradcam",
        args.class_name,
        args.layer,
        args.out,
        args.device,
        args.score_threshold,
    )
    if args.format == "json":
        print_json(documents)
        return 0
    for document in documents:
        drawn = f"; drawn to {document['drawing']}" if "drawing" in document else ""
        if "boxes" in document:  # a detection run: one map per box
            print(f"{document['file']}: {len(document['boxes'])} box(es){drawn}")
            for box in document["boxes"]:
                if box["peak_xy"] is None:
                    where = "is zero everywhere (no evidence for the box at this layer)"
                else:
                    x, y = box["peak_xy"]
                    side = "inside" if box["peak_in_box"] else "outside"
                    where = f"peaks at pixel ({x:g}, {y:g}), {side} the box"
                print(
                    f"  {box['class']} {box['score']:.2f} at {[round(v) for v in box['box']]}:"
                    f" {box['method']} at {box['layer']} {where};"
                    f" {box['top10_share']:.0%} of the map in its top 10% of pixels,"
                    f" {box['seconds'] * 1000:.0f} ms"
                )
            continue
        x, y = document["peak_xy"]
        print(
            f"{document['file']}: {document['method']} at {document['layer']} for"
            f" {document['class']} (p={document['probability']:.2f}): peak at pixel"
            f" ({x:g}, {y:g}), {document['top10_share']:.0%} of the map in its top 10%"
            f" of pixels, {document['seconds'] * 1000:.0f} ms{drawn}"
        )
    return 0


def cmd_features(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.features import feature_maps_file, filters_file

    if args.filters:
        document = filters_file(args.run, args.out or "filters.png", args.device)
    else:
        if args.image is None:
            raise CnnlabError("features needs an IMAGE (or --filters)")
        document = feature_maps_file(
            args.run, args.image, args.layer, args.top, args.out or "features.png", args.device
        )
    if args.format == "json":
        print_json(document)
    else:
        print(document["description"])
    return 0


def heatmap_line(result: dict, out: str | None) -> str:
    """The heat map's text in one convention, stated: (x, y) with x the column from the
    left and y the row from the top, in pixels of the image and in cells of the map."""
    rows, cols = result["shape"]
    (x, y), box = result["peak_xy"], result["peak_box"]
    row, col = result["peak"]
    return (
        f"{result['class']}: a {cols}x{rows} probability map (width x height); P({result['class']})"
        f" peaks at {result['prob']:.2%} at cell (x {col}, y {row}), around pixel"
        f" (x {x:g}, y {y:g}) of the image: the window x {box[0]:g} to {box[2]:g},"
        f" y {box[1]:g} to {box[3]:g} (x: from the left, y: from the top)"
        + (f"; drawn to {out}" if out else "")
    )


def cmd_serve(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.serve import serve

    if not args.max_upload_mb > 0:  # also refuses nan
        raise CnnlabError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    upload = int(args.max_upload_mb * 1000 * 1000)
    return serve(
        args.runs,
        args.host,
        args.port,
        args.device,
        args.queue_size,
        upload,
        args.workers,
        args.threads,
        args.allow_host,
        args.upload_timeout,
        _memory_limit(args.max_memory),
    )


def cmd_explore(args: argparse.Namespace, extra: dict) -> int:
    """``cnnlab explore``: ``cnnlab serve``'s server on this machine only, for one model."""
    from cnnlab.serve import serve

    if not args.max_upload_mb > 0:  # also refuses nan
        raise CnnlabError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    return serve(
        [],
        "127.0.0.1",
        args.port,
        "cpu",
        max_upload=int(args.max_upload_mb * 1000 * 1000),
        upload_timeout=args.upload_timeout,
        max_memory=_memory_limit(args.max_memory),
        explore=args.model,
        explore_input=parse_input(args.input) if args.input else None,
    )
