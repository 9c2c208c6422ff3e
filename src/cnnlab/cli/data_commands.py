"""The handlers of the commands about image folders: ``data digits|shapes|convert|check|
clean`` and ``detect proposals`` (the recall of region proposals on a folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnlab.cli.output import print_json


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
