"""The parsers of the commands that inspect architectures (``models``, ``summary``,
``compare``; their handlers: ``cnnlab.cli.inspect_commands``)."""

from __future__ import annotations

import argparse
import functools

from cnnlab.cli.flags import Group, add_batch, add_command, add_format, add_overwrite, models_help
from cnnlab.cli.inspect_commands import cmd_compare, cmd_models, cmd_summary


def add_inspect_commands(commands: Group) -> None:
    """``models``, ``summary`` and ``compare``."""
    sub = add_command(commands, "models", cmd_models, "list every registered model")
    sub.add_argument(
        "pattern", nargs="?", help="only names matching: a glob (resnet*) or a part (resnet)"
    )
    _add_wide(sub, "every column, at any width (narrow terminals leave some out)")
    add_format(sub, ("table", "json"))
    sub = add_command(
        commands,
        "summary",
        cmd_summary,
        "per-layer output size (with its formula), parameters (with theirs), MACs, FLOPs,"
        " receptive field and, with --batch, the memory of a training step",
        epilog_of=functools.partial(models_help, None),
        model_args_from="model",
    )
    sub.add_argument(
        "model",
        help="a registered model (`cnnlab models`), torchvision:NAME, path/to/file.py:Name"
        " or package.module:name",
    )
    sub.add_argument("--input", help="C,H,W (default: the model's natural input, or 3,224,224)")
    sub.add_argument("--num-classes", type=int, help="(default: the model's own)")
    sub.add_argument("--kwargs", help="keyword arguments for the model, as a JSON object")
    sub.add_argument("--depth", type=int, help="expand containers this deep (default: all)")
    _add_wide(sub, "one line per layer, formulas included, at any width")
    add_batch(sub, None, "estimate the activation memory autograd keeps at this batch size")
    sub.add_argument(
        "--train",
        action="store_true",
        help="and the whole training step: weights, gradients, optimiser state, activations",
    )
    sub.add_argument(
        "--optimizer",
        choices=("adamw", "adam", "sgd"),
        default="adamw",
        help="whose state --train counts",
    )
    sub.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="the largest batch whose training step fits in SIZE (8GB, 512MB, 16GiB)",
    )
    sub.add_argument(
        "--strict", action="store_true", help="exit 2 if any operation's FLOPs were not counted"
    )
    sub.add_argument(
        "--erf",
        action="store_true",
        help="measure each stage's effective receptive field (MODEL: fresh weights; a run"
        " folder: its trained weights) and draw erf.png",
    )
    sub.add_argument("--erf-out", default="erf.png", help="where --erf draws its heat maps")
    add_format(sub, ("table", "json"))
    sub = add_command(
        commands,
        "compare",
        cmd_compare,
        "models side by side: depth, parameters (and the share in dense layers), MACs, FLOPs,"
        " receptive field, output stride, training-step memory",
    )
    sub.add_argument("models", nargs="+", metavar="MODEL", help="as for `cnnlab summary`")
    sub.add_argument("--input", help="C,H,W for every model (default: each model's own)")
    sub.add_argument("--kwargs", help="keyword arguments for every model, as a JSON object")
    sub.add_argument("--plot", metavar="FILE", help="draw parameters against MACs into this PNG")
    add_overwrite(sub, "an existing --plot FILE")
    add_batch(sub, 1, "the batch size of the training step whose memory is estimated (AdamW)")
    _add_wide(sub, "every column, at any width (narrow terminals leave some out)")
    add_format(sub, ("table", "json"))


def _add_wide(sub: argparse.ArgumentParser, help_text: str) -> None:
    sub.add_argument("--wide", action="store_true", help=help_text)
