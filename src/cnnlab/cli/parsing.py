"""The parser of every command, built from the declarations: the training flags from
``TrainConfig``, each task's commands and prediction options from ``cnnlab.tasks.TASKS``,
the shared flags from one helper each (``cnnlab.cli.flags``)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from cnnlab.attribution import METHODS
from cnnlab.cli.data_commands import cmd_data, cmd_proposals
from cnnlab.cli.deploy_commands import cmd_benchmark, cmd_explore, cmd_export, cmd_serve
from cnnlab.cli.explain_commands import cmd_explain, cmd_features, cmd_heatmap
from cnnlab.cli.flags import (
    Parser,
    add_backend,
    add_batch,
    add_compile,
    add_device,
    add_format,
    add_overwrite,
    add_task_options,
    add_upload_limits,
    config_flags,
    models_help,
    positive,
)
from cnnlab.cli.inspect_commands import cmd_compare, cmd_models, cmd_summary
from cnnlab.cli.train_commands import (
    cmd_cv,
    cmd_demo,
    cmd_eval,
    cmd_lr_find,
    cmd_predict,
    cmd_train,
)
from cnnlab.tasks import TASKS, TaskEntry

Group = Any  # argparse's subparsers action (a private class)


def build_parser() -> argparse.ArgumentParser:
    """Every command with its flags and its handler (``cnnlab.cli.*_commands``)."""
    from cnnlab.version import __version__

    parser = Parser(
        prog="cnnlab",
        description="Build, inspect and train the classic convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _inspector_commands(commands)
    _data_commands(commands)
    for entry in TASKS.values():
        group = commands
        if entry.command:
            holder = _add(
                commands, entry.command, None, f"{entry.name}: train, evaluate and predict"
            )
            group = holder.add_subparsers(dest="action", required=True, metavar="ACTION")
        _task_commands(group, entry)
    _tool_commands(commands)
    return parser


def _add(
    group: Group,
    name: str,
    handler: Callable | None,
    help_text: str,
    epilog_of: Callable[[], str] | None = None,
    **defaults: Any,
) -> argparse.ArgumentParser:
    sub = group.add_parser(name, help=help_text, description=help_text, epilog_of=epilog_of)
    sub.set_defaults(handler=handler, **defaults)
    return sub


def _inspector_commands(commands: Group) -> None:
    sub = _add(commands, "models", cmd_models, "list every registered model")
    sub.add_argument(
        "pattern", nargs="?", help="only names matching: a glob (resnet*) or a part (resnet)"
    )
    _add_wide(sub, "every column, at any width (narrow terminals leave some out)")
    add_format(sub, ("table", "json"))
    sub = _add(
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
    sub = _add(
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


def _data_commands(commands: Group) -> None:
    data = _add(commands, "data", None, "make, check and clean image folders")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    sub = _add(actions, "digits", cmd_data, "write scikit-learn's 1,797 digits as PNG folders")
    sub.add_argument("dst", help="the folder to create, one subfolder per digit")
    sub.add_argument("--size", type=positive, default=32, help="image side in pixels")
    sub = _add(actions, "check", cmd_data, "counts, sizes, unreadable files and duplicates")
    sub.add_argument(
        "dir", help="class folders, train/ val/ test/ of them, or a CSV of file,label rows"
    )
    _images_flag(sub)
    add_format(sub)
    sub = _add(actions, "shapes", cmd_data, "synthetic shapes for segmentation or detection")
    sub.add_argument("dst", help="the folder to create")
    sub.add_argument("--task", choices=("segment", "detect"), required=True, help="masks, or boxes")
    sub.add_argument("--n", type=positive, default=400, help="number of images")
    sub.add_argument("--size", type=positive, default=128, help="image side")
    sub.add_argument("--seed", type=int, default=0, help="what the images show")
    sub = _add(actions, "clean", cmd_data, "copy a class-folder tree into a clean new folder")
    sub.add_argument("src", help="class folders or a CSV of file,label rows (left as they are)")
    _images_flag(sub)
    sub.add_argument("dst", help="the new folder")
    sub.add_argument(
        "--strip-prefix",
        default=r"^n\d+[-_]",
        help="regex removed from class folder names (WordNet ids like n02085620-)",
    )
    add_format(sub)
    _convert_command(actions)


def _convert_command(actions: Group) -> None:
    sub = _add(
        actions,
        "convert",
        cmd_data,
        "write a detection folder (COCO, YOLO txt or Pascal VOC) in another of the three",
    )
    sub.add_argument("src", help="a detection folder (left as it is)")
    sub.add_argument("dst", help="the new folder")
    sub.add_argument("--to", choices=("coco", "voc", "yolo"), required=True, help="DST's format")
    add_format(sub)


def _images_flag(sub: argparse.ArgumentParser) -> None:
    from cnnlab.config import TrainConfig

    help_text = next(f for f in fields(TrainConfig) if f.name == "images").metadata["help"]
    sub.add_argument("--images", metavar="DIR", help=help_text)


def _task_commands(group: Group, entry: TaskEntry) -> None:
    """train, eval and predict of ``entry`` (and detection's proposals)."""
    sub = _add(
        group,
        "train",
        cmd_train,
        f"train {entry.noun}",
        epilog_of=functools.partial(models_help, entry.name),
        task=entry.name,
        action="train",
        model_args_from="model",
    )
    sub.add_argument("data", nargs="?", metavar="DIR", help="the data folder")
    sub.add_argument("--out", help="the run folder to create")
    sub.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    config_flags(sub, entry.name)
    add_format(sub)

    sub = _add(
        group,
        "eval",
        cmd_eval,
        "evaluate a run on its own split or another folder",
        task=entry.name,
        action="eval",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument(
        "dir", nargs="?", metavar="DIR", help="another data folder (default: the run's own)"
    )
    sub.add_argument("--split", choices=entry.splits, default=entry.eval_split)
    add_device(sub)
    add_backend(sub)
    add_compile(sub)
    add_task_options(sub, entry, "eval")
    add_format(sub)

    sub = _add(
        group,
        "predict",
        cmd_predict,
        "run it on image files and folders",
        task=entry.name,
        action="predict",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders")
    drawn = f"a new ./{entry.predict_folder}" if entry.predict_folder else "none: nothing drawn"
    sub.add_argument(
        "--out",
        "--save",
        dest="out",
        metavar="DIR",
        help=f"folder for the drawn results (default: {drawn})",
    )
    sub.add_argument(
        "--save-csv",
        metavar="FILE",
        help="write the predictions to a CSV file, one row per class, box or mask class",
    )
    add_overwrite(sub, "files already in --out / --save-csv")
    add_device(sub)
    add_backend(sub)
    add_compile(sub)
    add_task_options(sub, entry, "predict")
    add_format(sub)

    for name in entry.tools:
        TASK_TOOLS[name](group)


def _proposals_command(group: Group) -> None:
    sub = _add(
        group,
        "proposals",
        cmd_proposals,
        "selective-search region proposals of every image, cached beside the data;"
        " prints boxes per image and their recall of the labelled boxes",
    )
    sub.add_argument("data", metavar="DIR", help="a detection data folder")
    sub.add_argument("--mode", choices=("fast", "quality"), default="fast")
    sub.add_argument("--max", type=positive, default=2000, help="boxes kept per image")
    sub.add_argument("--file", help="read a proposal file of your own instead (docs/proposals.md)")
    sub.add_argument("--workers", type=positive, default=1, help="processes computing")
    add_format(sub)


# The commands a task adds beside train, eval and predict (``TaskEntry.tools``).
TASK_TOOLS: dict[str, Callable[[Group], None]] = {"proposals": _proposals_command}


def _tool_commands(commands: Group) -> None:
    sub = _add(
        commands,
        "cv",
        cmd_cv,
        "stratified K-fold cross-validation of a classifier: a run per fold, mean ± std",
        epilog_of=functools.partial(models_help, "classify"),
        task="classify",
        action="train",
        model_args_from="model",
    )
    sub.add_argument("data", nargs="?", metavar="DIR", help="the data folder")
    sub.add_argument("--out", help="the folder to create: OUT/fold-I/, OUT/cv.json")
    sub.add_argument("--folds", type=positive, default=5, help="K, the number of folds")
    sub.add_argument("--resume", metavar="OUT", help="continue an interrupted cross-validation")
    config_flags(sub, "classify", skip=("split_file",))
    add_format(sub)

    sub = _add(
        commands,
        "lr-find",
        cmd_lr_find,
        "learning-rate range test: loss while the lr grows exponentially, and a suggested lr",
        model_args_from="model",
        task="classify",
    )
    sub.add_argument("data", metavar="DIR", help="class folders, or train/ val/ test/")
    sub.add_argument("--out", default=".", help="folder for lr_find.png, or a .png path")
    sub.add_argument("--start-lr", type=float, default=1e-7, help="the first step's lr")
    sub.add_argument("--end-lr", type=float, default=10.0, help="the last step's lr")
    sub.add_argument("--steps", type=int, default=100, help="optimizer steps")
    add_overwrite(sub, "an existing lr_find.png (or --out .png file)")
    config_flags(
        sub,
        "classify",
        skip=(
            "lr",
            "epochs",
            "warmup_epochs",
            "lr_interval",
            "patience",
            "min_delta",
            "split_file",
        ),
    )
    add_format(sub)

    sub = _add(
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

    sub = _add(
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

    sub = _add(
        commands, "demo", cmd_demo, "the built-in job: train the notes' ConvNet on the digits"
    )
    sub.add_argument("--task", choices=tuple(TASKS), default="classify")
    sub.add_argument("--out", help="run folder (default runs/demo, runs/demo2, ...)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar, no epoch lines")

    sub = _add(commands, "heatmap", cmd_heatmap, "where a classification run sees each class")
    sub.add_argument("run", help="a classification run folder")
    sub.add_argument("image", help="an image, best larger than the training size")
    sub.add_argument("--class", dest="class_name", help="class to map (default: highest peak)")
    sub.add_argument("--out", help="write the map over the image to this PNG")
    add_overwrite(sub, "an existing --out PNG")
    add_device(sub)
    add_format(sub)

    sub = _add(
        commands,
        "explain",
        cmd_explain,
        "where a run's evidence lies in each image (Grad-CAM and other maps), and --audit:"
        " the sanity checks of those maps",
    )
    sub.add_argument(
        "run", help="a classification, segmentation or detection run folder (one map per box)"
    )
    sub.add_argument("paths", nargs="*", metavar="IMAGE", help="image files")
    sub.add_argument(
        "--method",
        choices=METHODS,
        help="the map (default: gradcam; --audit: every method)",
    )
    sub.add_argument(
        "--class",
        dest="class_name",
        help="class to explain (default: predicted; detection: only its boxes)",
    )
    sub.add_argument(
        "--layer", help="layer as `cnnlab summary` names it (default: the last conv stage)"
    )
    sub.add_argument("--out", metavar="DIR", help="draw each map to DIR/IMAGE_METHOD.png")
    sub.add_argument(
        "--score-threshold",
        type=float,
        help="detection: map the boxes scoring at least this (default: predict's, 0.25)",
    )
    sub.add_argument(
        "--audit", action="store_true", help="randomisation and deletion/insertion checks"
    )
    sub.add_argument(
        "--images", type=positive, default=8, help="--audit without IMAGE: the run's first N"
    )
    add_device(sub)
    add_format(sub)

    sub = _add(
        commands,
        "features",
        cmd_features,
        "a layer's activation maps for an image, or (--filters) the first convolution's kernels",
    )
    sub.add_argument("run", help="a run folder")
    sub.add_argument("image", nargs="?", help="an image (not needed with --filters)")
    sub.add_argument(
        "--layer", help="layer as `cnnlab summary` names it (default: the last conv stage)"
    )
    sub.add_argument("--top", type=positive, default=16, help="the K most active channels")
    sub.add_argument("--filters", action="store_true", help="draw the first conv's kernels")
    sub.add_argument("--out", metavar="FILE", help="the PNG (default: features.png/filters.png)")
    add_device(sub)
    add_format(sub)

    sub = _add(
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

    sub = _add(commands, "serve", cmd_serve, "a web page and JSON API for trying runs")
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
