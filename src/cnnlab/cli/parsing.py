"""Reading the command line: the parser (training flags generated from ``TrainConfig``'s
fields) and the model builder's pass-through arguments."""

from __future__ import annotations

import argparse
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import cnnlab.cli.commands as c
from cnnlab.cli.commands import EXPLICIT_NONE, TASK_COMMANDS
from cnnlab.errors import CnnlabError


def parse_value(text: str) -> object:
    """A model argument from the command line: 32,64 -> (32, 64); 3 -> 3; 0.5 -> 0.5."""
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(parse_value(p) for p in text.split(",") if p)
    return text


def builder_args(extra: Sequence[str], model: str) -> dict:
    """Turn unknown ``--key value`` pairs into keyword arguments the model's builder takes;
    a builder's on/off setting (a bool default) also reads as ``--key`` or ``--no-key``."""
    from cnnlab.registry import model_info

    parameters = inspect.signature(model_info(model).builder).parameters

    def is_switch(name: str) -> bool:
        return name in parameters and isinstance(parameters[name].default, bool)

    args: dict = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise CnnlabError(f"unexpected argument {token!r}")
        flag, _, value = token[2:].partition("=")
        key = flag.replace("-", "_")
        if not value and (not tokens or tokens[0].startswith("--")):
            if is_switch(key):
                args[key] = True
                continue
            if key.startswith("no_") and is_switch(key[3:]):
                args[key[3:]] = False
                continue
            raise CnnlabError(f"--{flag} needs a value")
        args[key] = parse_value(value or tokens.pop(0))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    own = [n for n in parameters if n not in {"num_classes", "in_channels", "kwargs"}]
    for key in args:
        if key not in parameters and not takes_any:
            known = ", ".join(f"--{n.replace('_', '-')}" for n in own) or "none"
            raise CnnlabError(
                f"{model} does not take --{key.replace('_', '-')} (it takes: {known})"
            )
    return args


def _config_flags(sub: argparse.ArgumentParser, task: str, skip: Sequence[str] = ()) -> None:
    """One flag per TrainConfig field, with its help, choices and ``task``'s default."""
    from cnnlab.config import TrainConfig, default_of

    hints = typing.get_type_hints(TrainConfig)
    for item in fields(TrainConfig):
        if not item.metadata.get("cli", True) or item.name in skip:
            continue
        flag = f"--{item.name.replace('_', '-')}"
        default = default_of(task, item.name)
        help_text = f"{item.metadata['help']} (default: {default})"
        options = typing.get_args(hints[item.name]) or (hints[item.name],)
        kind = next(t for t in options if t is not type(None))
        if kind is bool:
            sub.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = item.metadata.get("choices")
        parse = _optional(kind) if type(None) in options else kind
        sub.add_argument(flag, type=parse, choices=choices, help=help_text)


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1] (a probability or a threshold)."""
    value = float(text)
    if not 0 <= value <= 1:  # also refuses nan
        raise ValueError(text)
    return value


def positive(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where --help is)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every command with its flags and its handler (``cnnlab.cli.commands``)."""
    from cnnlab import __version__

    parser = Parser(
        prog="cnnlab",
        description="Build, inspect and train the classic convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group, name: str, handler: Callable | None, help_text: str, **defaults):
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, **defaults)
        return sub

    def fmt(sub: argparse.ArgumentParser, choices=("text", "json")) -> None:
        sub.add_argument("--format", choices=choices, default=choices[0])

    sub = add(commands, "models", c.cmd_models, "list every registered model")
    fmt(sub, ("table", "json"))
    sub = add(
        commands,
        "summary",
        c.cmd_summary,
        "per-layer output shape, parameters (with formula), MACs and receptive field",
        model_args_from="model",
    )
    sub.add_argument("model", help="a registered model name (see `cnnlab models`)")
    sub.add_argument("--input", help="C,H,W (default: the model's natural input)")
    sub.add_argument("--num-classes", type=int)
    sub.add_argument("--depth", type=int, help="expand containers this deep (default: all)")
    fmt(sub, ("table", "json"))

    data = add(commands, "data", None, "make, check and clean image folders")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub = add(actions, "digits", c.cmd_data, "write scikit-learn's 1,797 digits as PNG folders")
    sub.add_argument("dst")
    sub.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    sub = add(actions, "check", c.cmd_data, "counts, sizes, unreadable files and duplicates")
    sub.add_argument("dir")
    fmt(sub)
    sub = add(actions, "shapes", c.cmd_data, "synthetic shapes for segmentation or detection")
    sub.add_argument("dst")
    sub.add_argument("--task", choices=("segment", "detect"), required=True)
    sub.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    sub.add_argument("--size", type=int, default=128, help="image side (default 128)")
    sub.add_argument("--seed", type=int, default=0)
    sub = add(actions, "clean", c.cmd_data, "copy a class-folder tree into a clean new folder")
    sub.add_argument("src")
    sub.add_argument("dst")
    sub.add_argument(
        "--strip-prefix",
        default=r"^n\d+[-_]",
        help="regex removed from class folder names (default: WordNet ids like n02085620-)",
    )
    fmt(sub)

    for task, prefix in TASK_COMMANDS.items():
        group = commands
        if prefix:
            holder = add(commands, task, None, f"{task}: train, evaluate and predict")
            group = holder.add_subparsers(dest="action", required=True, metavar="ACTION")
        what = {"classify": "a classifier", "segment": "a segmentation model"}.get(
            task, "a detector"
        )
        sub = add(
            group,
            "train",
            c.cmd_train,
            f"train {what}",
            task=task,
            action="train",
            model_args_from="model",
        )
        sub.add_argument("data", nargs="?", metavar="DIR", help="the data folder")
        sub.add_argument("--out", help="the run folder to create")
        sub.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
        _config_flags(sub, task)
        fmt(sub)
        sub = add(
            group,
            "eval",
            c.cmd_eval,
            "evaluate a run on its own split or another folder",
            task=task,
            action="eval",
        )
        sub.add_argument("run")
        sub.add_argument("dir", nargs="?", metavar="DIR")
        splits = ("train", "val", "test") if task == "classify" else ("train", "val")
        sub.add_argument("--split", choices=splits, help="(default: test, else val)")
        sub.add_argument("--device", default="auto")
        if task == "detect":
            sub.add_argument("--score-threshold", type=fraction, help="(default: 0.001)")
        fmt(sub)
        sub = add(
            group,
            "predict",
            c.cmd_predict,
            "run it on image files and folders",
            task=task,
            action="predict",
        )
        sub.add_argument("run")
        sub.add_argument("paths", nargs="+", metavar="IMAGE")
        default_out = "a new ./predictions" if task == "segment" else "none: nothing drawn"
        sub.add_argument("--out", help=f"folder for the drawn results (default: {default_out})")
        sub.add_argument("--overwrite", action="store_true", help="replace files already in --out")
        sub.add_argument("--device", default="auto")
        if task == "classify":
            sub.add_argument("--topk", type=int, default=5)
        if task == "detect":
            sub.add_argument("--score-threshold", type=fraction, help="(default: 0.25)")
        fmt(sub)

    sub = add(
        commands,
        "lr-find",
        c.cmd_lr_find,
        "learning-rate range test: loss while the lr grows exponentially, and a suggested lr",
        model_args_from="model",
        task="classify",
    )
    sub.add_argument("data", metavar="DIR", help="class folders, or train/ val/ test/")
    sub.add_argument("--out", default=".", help="folder for lr_find.png, or a .png path")
    sub.add_argument("--start-lr", type=float, default=1e-7)
    sub.add_argument("--end-lr", type=float, default=10.0)
    sub.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    _config_flags(
        sub, "classify", skip=("lr", "epochs", "warmup_epochs", "lr_interval", "patience")
    )
    fmt(sub)

    sub = add(
        commands, "demo", c.cmd_demo, "the built-in job: train the notes' ConvNet on the digits"
    )
    sub.add_argument("--task", choices=tuple(TASK_COMMANDS), default="classify")
    sub.add_argument("--out", help="run folder (default runs/demo, runs/demo2, ...)")
    sub.add_argument("--quiet", action="store_true")
    sub = add(commands, "heatmap", c.cmd_heatmap, "where a classification run sees each class")
    sub.add_argument("run")
    sub.add_argument("image")
    sub.add_argument("--class", dest="class_name", help="class to map (default: highest peak)")
    sub.add_argument("--out", help="write the map over the image to this PNG")
    sub.add_argument("--device", default="auto")
    fmt(sub)
    sub = add(commands, "serve", c.cmd_serve, "a web page and JSON API for trying runs")
    sub.add_argument("runs", nargs="+", metavar="RUN", help="run folders of any task")
    sub.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, this machine)")
    sub.add_argument("--port", type=int, default=8000, help="(default 8000; 0: any free port)")
    sub.add_argument("--device", default="auto")
    sub.add_argument(
        "--queue-size", type=positive, default=32, help="predictions inside at once (default 32)"
    )
    sub.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest image file (default 20 MB)"
    )
    sub.add_argument("--workers", type=positive, default=1, help="inference threads (default 1)")
    sub.add_argument(
        "--threads", type=positive, help="torch threads per worker (default: CPUs - 1, shared)"
    )
    return parser
