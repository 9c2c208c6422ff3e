"""The handlers of the commands that take a model beyond training: the web page and JSON
API (``serve``, ``explore``), files for other runtimes (``export``) and their speed
(``benchmark``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab.cli.flags import upload_limits
from cnnlab.cli.output import print_json
from cnnlab.errors import CnnlabError


def cmd_serve(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.serve import serve

    return serve(
        args.runs,
        args.host,
        args.port,
        args.device,
        args.queue_size,
        workers=args.workers,
        threads=args.threads,
        allow_hosts=args.allow_host,
        **upload_limits(args),
    )


def cmd_explore(args: argparse.Namespace, extra: dict) -> int:
    """``cnnlab explore``: ``cnnlab serve``'s server on this machine only, for one model."""
    from cnnlab.inspect.specs import parse_input_size
    from cnnlab.serve import serve

    return serve(
        [],
        "127.0.0.1",
        args.port,
        "cpu",
        explore=args.model,
        explore_input=parse_input_size(args.input),
        **upload_limits(args),
    )


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
