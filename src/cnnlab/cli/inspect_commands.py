"""The handlers of the commands that inspect architectures, no training needed: ``models``,
``summary`` (with ``--erf``, also of a run's trained weights) and ``compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli.flags import memory_limit, parse_kwargs
from cnnlab.cli.output import console_width, new_console, print_json, print_table
from cnnlab.errors import CnnlabError


def cmd_models(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import models_table
    from cnnlab.inspect.cache import cached_model_table_rows

    rows = cached_model_table_rows(args.pattern)
    if args.format == "json":
        print_json(rows)
    else:
        console = new_console(args.wide)
        print_table(models_table(rows, console_width(console)), console)
    return 0


def cmd_summary(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import render_summary
    from cnnlab.inspect.specs import parse_input_size, summarize_spec

    if args.erf:
        return _summary_erf(args, extra)
    size = parse_input_size(args.input)
    limit = memory_limit(args.max_memory)
    kwargs = {**parse_kwargs(args.kwargs), **extra}
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
    console = new_console(args.wide)
    title = f"{args.model} at {'x'.join(map(str, size))}"
    console.print(render_summary(summary, title, console_width(console), wide=args.wide or None))
    if fit is not None:
        print(_fit_line(args.max_memory, args.optimizer, document["max_memory"]))
    return 0


def _summary_erf(args: argparse.Namespace, extra: dict) -> int:
    """``summary MODEL --erf`` (fresh weights) or ``summary RUN --erf`` (trained ones)."""
    from cnnlab.explain_plots import plot_erf
    from cnnlab.inspect.erf import effective_fields, erf_table
    from cnnlab.inspect.specs import parse_input_size

    size = parse_input_size(args.input)
    if (Path(args.model) / "model.json").is_file():
        from cnnlab.runs import load_run

        run = load_run(args.model, "cpu", fast=False)
        model, what = run.model, f"{args.model} (trained weights)"
        size = size or (run.task.in_channels, run.task.img_size, run.task.img_size)
    else:
        from cnnlab.inspect.specs import build_model

        kwargs = {**parse_kwargs(args.kwargs), **extra}
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


def _fit_line(text: str, optimizer: str, fit: dict) -> str:
    if not fit["max_batch"]:
        return f"Max batch in {text}:     none: one sample's training step does not fit"
    return (
        f"Max batch in {text}:     {fit['max_batch']:,} (training step"
        f" {fit['training_step'] / 1e6:,.2f} MB with {optimizer})"
    )


def cmd_compare(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect.compare import compare, compare_table
    from cnnlab.inspect.specs import parse_input_size

    size = parse_input_size(args.input)
    if args.plot:
        from cnnlab.destinations import check_targets

        check_targets([Path(args.plot)], [], args.overwrite, "--plot")
    rows = compare(args.models, size, parse_kwargs(args.kwargs), batch=args.batch)
    if args.plot:
        from cnnlab.plots import plot_compare

        plot_compare(rows, Path(args.plot))
    if args.format == "json":
        print_json(rows)
    else:
        console = new_console(args.wide)
        print_table(compare_table(rows, console_width(console)), console)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
