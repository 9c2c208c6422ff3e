"""Reading the command line: the parser (training flags generated from ``TrainConfig``'s
fields) and the model builder's pass-through arguments."""

from __future__ import annotations

import argparse
import functools
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
    """Turn unknown ``--key value`` pairs into keyword arguments the model's builder takes
    (``ModelInfo.options``); an on/off setting (a bool default) also reads as ``--key`` or
    ``--no-key``."""
    from cnnlab.models.factory import model_info

    options = model_info(model).options

    def is_switch(name: str) -> bool:
        return isinstance(options.get(name), bool)

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
    for key in args:
        if key not in options and key != "num_classes":  # the data decides; train checks
            known = ", ".join(f"--{n.replace('_', '-')}" for n in options) or "none"
            raise CnnlabError(
                f"{model} does not take --{key.replace('_', '-')} (it takes: {known})"
            )
    return args


def models_help(task: str) -> str:
    """The epilog of a train command: the task's models and each one's own flags."""
    from cnnlab.config import TrainConfig
    from cnnlab.models.factory import list_models, model_info

    config_flags = {f.name for f in fields(TrainConfig)}
    wrap = functools.partial(_wrap, width=78)
    lines = [*wrap(f"models (--model): {', '.join(list_models(task=task))}".split(" "), ""), ""]
    lines.append("model flags:")
    seen: dict[tuple[str, ...], list[str]] = {}  # the same flags (a family) are listed once
    for name in list_models(task=task):
        flags = tuple(
            f"--{key.replace('_', '-')} {_shown(default)}"
            for key, default in model_info(name).options.items()
            if key not in config_flags  # --img-size is a training flag, listed above
        )
        seen.setdefault(flags or ("(none)",), []).append(name)
    for flags, names in seen.items():
        lines += wrap(f"{', '.join(names)}:".split(" "), "  ")
        lines += wrap(list(flags), "      ")
    return "\n".join(lines)


def _wrap(units: list[str], indent: str, width: int) -> list[str]:
    """``units`` joined by spaces into lines of at most ``width``, never splitting a unit
    (a flag stays beside its value)."""
    lines, line = [], indent
    for unit in units:
        if line.strip() and len(line) + 1 + len(unit) > width:
            lines.append(line)
            line = indent
        line = f"{line} {unit}" if line.strip() else f"{line}{unit}"
    return [*lines, line]


def _shown(default: object) -> str:
    if isinstance(default, tuple | list):
        return ",".join(map(str, default))
    return (
        "none"
        if default is None
        else str(default).lower()
        if isinstance(default, bool)
        else str(default)
    )


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


DEVICE_HELP = "auto (CUDA when available) | cpu | cuda | cuda:N"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help (unless the help says it already, or there is
    none); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where --help is), each
    flag's default shows in --help, and an epilog may be computed only when help is
    asked for (``epilog_of``: listing the models imports every model file)."""

    def __init__(self, *args: Any, epilog_of: Callable[[], str] | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        # No abbreviations: a model's own flag (--backbone) would be read as a prefix of a
        # training flag (--backbone-lr-mult) and its value refused.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.epilog_of = epilog_of

    def format_help(self) -> str:
        if self.epilog_of is not None:
            self.epilog = self.epilog_of()
        return super().format_help()

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

    def add(group, name: str, handler: Callable | None, help_text: str, epilog_of=None, **defaults):
        sub = group.add_parser(name, help=help_text, description=help_text, epilog_of=epilog_of)
        sub.set_defaults(handler=handler, **defaults)
        return sub

    def fmt(sub: argparse.ArgumentParser, choices=("text", "json")) -> None:
        sub.add_argument(
            "--format", choices=choices, default=choices[0], help="json: one JSON document"
        )

    def backend(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--backend",
            choices=("torch", "onnxruntime"),
            default="torch",
            help="onnxruntime: run RUN/model.onnx (`cnnlab export RUN`) on the CPU",
        )

    def test_time_augmentation(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--tta",
            action="store_true",
            help="average each image's class probabilities with its mirror image (when the"
            " run trained with flips) and a 90%% centre zoom (when it trained with crops)",
        )

    sub = add(commands, "models", c.cmd_models, "list every registered model")
    sub.add_argument(
        "pattern", nargs="?", help="only names matching: a glob (resnet*) or a part (resnet)"
    )
    fmt(sub, ("table", "json"))
    sub = add(
        commands,
        "summary",
        c.cmd_summary,
        "per-layer output size (with its formula), parameters (with theirs), MACs and"
        " receptive field",
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
    sub.add_argument(
        "--wide", action="store_true", help="one line per layer, formulas included, at any width"
    )
    fmt(sub, ("table", "json"))
    sub = add(
        commands,
        "compare",
        c.cmd_compare,
        "models side by side: depth, parameters (and the share in dense layers), MACs,"
        " receptive field, output stride",
    )
    sub.add_argument("models", nargs="+", metavar="MODEL", help="as for `cnnlab summary`")
    sub.add_argument("--input", help="C,H,W for every model (default: each model's own)")
    sub.add_argument("--kwargs", help="keyword arguments for every model, as a JSON object")
    sub.add_argument("--plot", metavar="FILE", help="draw parameters against MACs into this PNG")
    fmt(sub, ("table", "json"))

    data = add(commands, "data", None, "make, check and clean image folders")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub = add(actions, "digits", c.cmd_data, "write scikit-learn's 1,797 digits as PNG folders")
    sub.add_argument("dst", help="the folder to create, one subfolder per digit")
    sub.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    sub = add(actions, "check", c.cmd_data, "counts, sizes, unreadable files and duplicates")
    sub.add_argument("dir", help="class folders, or train/ val/ test/ of them")
    fmt(sub)
    sub = add(actions, "shapes", c.cmd_data, "synthetic shapes for segmentation or detection")
    sub.add_argument("dst", help="the folder to create")
    sub.add_argument("--task", choices=("segment", "detect"), required=True, help="masks, or boxes")
    sub.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    sub.add_argument("--size", type=int, default=128, help="image side (default 128)")
    sub.add_argument("--seed", type=int, default=0, help="what the images show")
    sub = add(actions, "clean", c.cmd_data, "copy a class-folder tree into a clean new folder")
    sub.add_argument("src", help="class folders (left as they are)")
    sub.add_argument("dst", help="the new folder")
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
            epilog_of=functools.partial(models_help, task),
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
        sub.add_argument("run", help="a run folder")
        sub.add_argument(
            "dir", nargs="?", metavar="DIR", help="another data folder (default: the run's own)"
        )
        splits = ("train", "val", "test") if task == "classify" else ("train", "val")
        sub.add_argument("--split", choices=splits, help="(default: test, else val)")
        sub.add_argument("--device", default="auto", help=DEVICE_HELP)
        backend(sub)
        if task == "classify":
            test_time_augmentation(sub)
        if task == "detect":
            sub.add_argument(
                "--score-threshold", type=fraction, help="keep boxes above (default: 0.001)"
            )
        fmt(sub)
        sub = add(
            group,
            "predict",
            c.cmd_predict,
            "run it on image files and folders",
            task=task,
            action="predict",
        )
        sub.add_argument("run", help="a run folder")
        sub.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders")
        default_out = "a new ./predictions" if task == "segment" else "none: nothing drawn"
        sub.add_argument(
            "--out",
            "--save",
            dest="out",
            metavar="DIR",
            help=f"folder for the drawn results (default: {default_out})",
        )
        sub.add_argument(
            "--save-csv",
            metavar="FILE",
            help="write the predictions to a CSV file, one row per class, box or mask class",
        )
        sub.add_argument(
            "--overwrite", action="store_true", help="replace files already in --out / --save-csv"
        )
        sub.add_argument("--device", default="auto", help=DEVICE_HELP)
        backend(sub)
        if task == "classify":
            sub.add_argument("--topk", type=int, default=5, help="classes listed per image")
            test_time_augmentation(sub)
        if task == "detect":
            sub.add_argument(
                "--score-threshold", type=fraction, help="keep boxes above (default: 0.25)"
            )
        fmt(sub)
        if task == "detect":
            sub = add(
                group,
                "proposals",
                c.cmd_proposals,
                "selective-search region proposals of every image, cached beside the data;"
                " prints boxes per image and their recall of the labelled boxes",
            )
            sub.add_argument("data", metavar="DIR", help="a detection data folder")
            sub.add_argument(
                "--mode", choices=("fast", "quality"), default="fast", help="(default fast)"
            )
            sub.add_argument(
                "--max", type=positive, default=2000, help="boxes kept per image (default 2000)"
            )
            sub.add_argument(
                "--file", help="read a proposal file of your own instead (docs/proposals.md)"
            )
            sub.add_argument(
                "--workers", type=positive, default=1, help="processes computing (default 1)"
            )
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
    sub.add_argument("--start-lr", type=float, default=1e-7, help="the first step's lr")
    sub.add_argument("--end-lr", type=float, default=10.0, help="the last step's lr")
    sub.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    _config_flags(
        sub, "classify", skip=("lr", "epochs", "warmup_epochs", "lr_interval", "patience")
    )
    fmt(sub)

    sub = add(
        commands,
        "export",
        c.cmd_export,
        "write a run's model as ONNX or torch.export .pt2, checked against the run first",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument(
        "--format", metavar="{onnx,pt2}", help="the file's format (default: --out's suffix, onnx)"
    )
    sub.add_argument("--out", metavar="FILE", help="(default: RUN/model.onnx or RUN/model.pt2)")
    sub.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    sub.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: one image)"
    )
    sub.add_argument("--images", type=int, default=8, help="validation images for the parity check")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    sub.add_argument("--json", action="store_true", help="print the record as one JSON document")

    sub = add(
        commands, "demo", c.cmd_demo, "the built-in job: train the notes' ConvNet on the digits"
    )
    sub.add_argument("--task", choices=tuple(TASK_COMMANDS), default="classify")
    sub.add_argument("--out", help="run folder (default runs/demo, runs/demo2, ...)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar, no epoch lines")
    sub = add(commands, "heatmap", c.cmd_heatmap, "where a classification run sees each class")
    sub.add_argument("run", help="a classification run folder")
    sub.add_argument("image", help="an image, best larger than the training size")
    sub.add_argument("--class", dest="class_name", help="class to map (default: highest peak)")
    sub.add_argument("--out", help="write the map over the image to this PNG")
    sub.add_argument("--device", default="auto", help=DEVICE_HELP)
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
        "--threads", type=positive, help="torch threads per worker (default: free cores - 1)"
    )
    return parser
