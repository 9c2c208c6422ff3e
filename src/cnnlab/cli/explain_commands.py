"""The handlers of the commands that show what a trained run sees in an image:
``explain`` (attribution maps, ``--audit``), ``heatmap`` and ``features``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnlab.cli.output import print_json
from cnnlab.errors import CnnlabError


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
