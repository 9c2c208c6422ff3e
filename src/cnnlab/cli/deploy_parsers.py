"""The parsers of the commands that take a run or model beyond training (``export``,
``benchmark``, ``explore``, ``serve``; their handlers: ``cnnlab.cli.deploy_commands``)."""

from __future__ import annotations

import argparse

from cnnlab.cli.deploy_commands import cmd_benchmark, cmd_explore, cmd_export, cmd_serve
from cnnlab.cli.flags import (
    Group,
    add_command,
    add_device,
    add_format,
    add_overwrite,
    add_upload_limits,
    positive,
)


def add_export_command(commands: Group) -> None:
    """``export``: ONNX or torch.export files of a run."""
    sub = add_command(
        commands,
        "export",
        cmd_export,
        "write a run's model as ONNX or torch.export .pt2, checked against the run first",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument(
        "--to", metavar="{onnx,pt2}", help="the file's format (default: --out's suffix, onnx)"
    )
    sub.add_argument("--out", metavar="FILE", help="(default: RUN/model.onnx or RUN/model.pt2)")
    sub.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    sub.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: one image)"
    )
    sub.add_argument("--images", type=int, default=8, help="validation images for the parity check")
    sub.add_argument(
        "--int8",
        action="store_true",
        help="quantise to int8 (RUN/model.int8.onnx; --backend onnxruntime-int8), kept only"
        " when the test metric holds",
    )
    sub.add_argument(
        "--calibration",
        type=int,
        default=64,
        metavar="N",
        help="--int8: training images its activation ranges are calibrated on",
    )
    sub.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        metavar="POINTS",
        help="--int8: the most points of the test metric int8 may lose (default 0.5)",
    )
    add_overwrite(sub, "an existing FILE")
    # --format names the printed record's form, as everywhere; `--format onnx|pt2` and
    # `--json` (before --to) still work, with a line saying what to write instead.
    sub.add_argument(
        "--format", metavar="{text,json}", default="text", help="json: one JSON document"
    )
    sub.add_argument("--json", action="store_true", help=argparse.SUPPRESS)


def add_benchmark_command(commands: Group) -> None:
    """``benchmark``: each format's size, accuracy and speed."""
    sub = add_command(
        commands,
        "benchmark",
        cmd_benchmark,
        "each format's size, accuracy and speed for a run, measured here (torch, onnx, int8...)",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument(
        "--formats",
        default="torch,compile,onnx,onnx-int8,pt2",
        help="comma-separated, of torch, compile, onnx, onnx-int8, pt2 (torch is always"
        " measured: the ratios are to it)",
    )
    sub.add_argument("--batch", default="1,16", help="batch sizes to time, comma-separated")
    sub.add_argument("--threads", type=positive, help="CPU threads (default: torch's)")
    sub.add_argument(
        "--images", type=positive, default=64, help="images timed per format and batch size"
    )
    sub.add_argument(
        "--save", action="store_true", help="write the files it builds into the run folder"
    )
    add_format(sub)


def add_explore_command(commands: Group) -> None:
    """``explore``: the explore page of one model."""
    sub = add_command(
        commands,
        "explore",
        cmd_explore,
        "a web page to explore a network: layers, formulas, feature maps, receptive fields",
    )
    sub.add_argument(
        "model",
        metavar="MODEL",
        help="a model name, a run folder, file.py:Name or torchvision:name",
    )
    sub.add_argument("--input", metavar="C,H,W", help="input size (default: the model's own)")
    sub.add_argument("--port", type=int, default=8000, help="0: any free port")
    add_upload_limits(sub)


def add_serve_command(commands: Group) -> None:
    """``serve``: the web page and JSON API of runs."""
    sub = add_command(commands, "serve", cmd_serve, "a web page and JSON API for trying runs")
    sub.add_argument("runs", nargs="+", metavar="RUN", help="run folders of any task")
    sub.add_argument("--host", default="127.0.0.1", help="the address to listen on (this machine)")
    sub.add_argument("--port", type=int, default=8000, help="0: any free port")
    add_device(sub)
    sub.add_argument(
        "--queue-size", type=positive, default=32, help="predictions inside the server at once"
    )
    sub.add_argument("--workers", type=positive, default=1, help="inference threads")
    sub.add_argument(
        "--threads", type=positive, help="torch threads per worker (default: free cores - 1)"
    )
    sub.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (repeatable; * any): the name you open"
        " the page by, beside --host, localhost and loopback addresses",
    )
    add_upload_limits(sub)
