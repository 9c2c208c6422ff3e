"""The ``cnnlab`` command: parses arguments, calls the Python API, prints the result.

Every command that reports numbers takes ``--format json`` and then prints exactly one JSON
document on stdout; tables and progress go to the terminal (progress on stderr). A
``CnnlabError`` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cnnlab.errors import CnnlabError

Handler = Callable[[argparse.Namespace, dict], int]


# ---------------------------------------------------------------------------- helpers


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _console():  # rich is imported lazily so `cnnlab --help` starts fast
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped to a file or a pager: never squeeze the table
        console = Console(width=240)
    return console


def _parse_input(text: str) -> tuple[int, int, int]:
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


def _parse_value(text: str) -> object:
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
        return tuple(_parse_value(p) for p in text.split(",") if p)
    return text


def _model_args(extra: Sequence[str], model: str) -> dict:
    """Turn unknown ``--key value`` pairs into keyword arguments the model's builder takes;
    a builder's on/off setting (a bool default) also reads as ``--key`` or ``--no-key``."""
    import inspect

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
        args[key] = _parse_value(value or tokens.pop(0))
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    own = [n for n in parameters if n not in {"num_classes", "in_channels", "kwargs"}]
    for key in args:
        if key not in parameters and not takes_any:
            known = ", ".join(f"--{n.replace('_', '-')}" for n in own) or "none"
            raise CnnlabError(
                f"{model} does not take --{key.replace('_', '-')} (it takes: {known})"
            )
    return args


# ---------------------------------------------------------------------------- zoo


def cmd_models(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import model_table_rows

    rows = model_table_rows()
    if args.format == "json":
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title="cnnlab models")
    for column in ("name", "family", "task", "params", "MACs", "input", "min input"):
        table.add_column(column, justify="right" if column in {"params", "MACs"} else "left")
    for row in rows:
        table.add_row(
            row["name"],
            row["family"],
            row["task"],
            f"{row['params']:,}",
            f"{row['macs'] / 1e9:.2f} G",
            "x".join(str(d) for d in row["input_size"]),
            str(row["min_size"]),
        )
    _console().print(table)
    return 0


def cmd_summary(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.inspect import render_summary, summarize
    from cnnlab.registry import create_model, model_info

    info = model_info(args.model)
    input_size = _parse_input(args.input) if args.input else info.input_size
    kwargs = dict(extra)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    kwargs.setdefault("in_channels", input_size[0])
    if "img_size" in _builder_parameters(args.model):
        kwargs.setdefault("img_size", (input_size[1], input_size[2]))
    model = create_model(args.model, **kwargs)
    summary = summarize(model, input_size=input_size, depth=args.depth)
    if args.format == "json":
        _print_json(summary.to_dict(args.model))
    else:
        _console().print(render_summary(summary, title=f"{args.model} {input_size}"))
    return 0


def _builder_parameters(model: str) -> set[str]:
    import inspect

    from cnnlab.registry import model_info

    return set(inspect.signature(model_info(model).builder).parameters)


# ---------------------------------------------------------------------------- data


def cmd_data_digits(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.data.digits import write_digits

    counts = write_digits(Path(args.dst), size=args.size)
    print(f"wrote {sum(counts.values())} digit images ({len(counts)} classes) to {args.dst}")
    return 0


def cmd_data_check(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.data.folders import check_folder, summarize_check

    report = check_folder(Path(args.dir))
    if args.format == "json":
        _print_json(report)
    else:
        print(summarize_check(report))
    return 0


def cmd_data_clean(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.data.folders import clean_folder

    report = clean_folder(Path(args.src), Path(args.dst), strip_prefix=args.strip_prefix)
    if args.format == "json":
        _print_json(report)
    else:
        left_out = len(report.get("left_out", []))
        print(
            f"cleaned {args.src} into {args.dst}; {left_out} files left out "
            f"(see {Path(args.dst) / 'clean_report.json'})"
        )
    return 0


# ---------------------------------------------------------------------------- classify


def _train_config(args: argparse.Namespace, extra: dict):
    from dataclasses import fields

    from cnnlab.engine import TrainConfig

    names = {f.name for f in fields(TrainConfig)} - {"model_args"}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return TrainConfig(model_args=extra, **values)


def cmd_train(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab import engine

    if args.resume:
        overrides = {k: getattr(args, k) for k in ("device", "workers") if getattr(args, k)}
        report = engine.resume(Path(args.resume), quiet=args.quiet, **overrides)
    else:
        if not args.data or not args.out:
            raise CnnlabError("train needs DIR and --out RUN (or --resume RUN)")
        report = engine.train(_train_config(args, extra))
    _print_report(report, args.format)
    return 0


def cmd_lr_find(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.lr_find import lr_find, plot_lr_find, png_path

    out = png_path(args.out)
    result = lr_find(
        _train_config(args, extra), start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps
    )
    plot_lr_find(result, out)
    if args.format == "json":
        _print_json(result.to_dict())
    else:
        print(f"suggested lr {result.suggested_lr:.2e}  (plot: {out})")
    return 0


def _print_report(report: dict, form: str) -> None:
    """A training or evaluation report of any task: JSON, or its task's one line."""
    from cnnlab.distributed import is_main_process

    if not is_main_process():  # under torchrun every process returns the report; one prints
        return
    if form == "json":
        _print_json(report)
    elif "map50" in report:
        print(
            f"mAP@[.5:.95] {report['map']:.3f}  mAP@0.5 {report['map50']:.3f}  "
            f"mAP@0.75 {report['map75']:.3f}  ({report['n_images']} images)"
        )
    elif "miou" in report:
        print(
            f"mIoU {report['miou']:.3f}  pixel accuracy {report['pixel_acc']:.3f}  "
            f"({report['n']} images)"
        )
    else:
        print(
            f"{report.get('split', 'test')} top-1 {report['top1']:.2%}  top-5 "
            f"{report['top5']:.2%}  loss {report['loss']:.4f}  ({report['n']} images)"
        )


def cmd_eval(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.runs import load_run

    run = load_run(Path(args.run), device=args.device)
    report = run.evaluate(Path(args.dir) if args.dir else None, split=args.split)
    _print_report(report, args.format)
    return 0


def cmd_predict(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.runs import load_run

    run = load_run(Path(args.run), device=args.device)
    results, errors = run.predict_files([Path(p) for p in args.paths], topk=args.topk)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.format == "json":
        _print_json(results)
    else:
        for result in results:
            top = ", ".join(f"{t['class']} {t['prob']:.1%}" for t in result["top"])
            print(f"{result['file']}: {top}")
    return 2 if errors else 0


def cmd_demo(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.demo import run_demo

    return run_demo(args.task, Path(args.out) if args.out else None, quiet=args.quiet)


# ---------------------------------------------------------------------------- beyond classification


def cmd_data_shapes(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.data.shapes import write_shapes

    write_shapes(Path(args.dst), task=args.task, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} {args.size}x{args.size} shape images for {args.task} to {args.dst}")
    return 0


def cmd_heatmap(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab.heatmap import heatmap

    result = heatmap(Path(args.run), Path(args.image), args.class_name, args.out, args.device)
    if args.format == "json":
        _print_json(result)
    else:
        rows, cols = result["shape"]
        print(
            f"{result['class']}: {rows}x{cols} probability map, peak at cell {result['peak']}"
            + (f"; drawn to {args.out}" if args.out else "")
        )
    return 0


def _task_settings(args: argparse.Namespace, extra: dict, names: Sequence[str]) -> dict:
    """The task-train flags the user set (None = keep the task's own default)."""
    settings = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if extra:
        settings["model_args"] = extra
    return settings


TASK_TRAIN_FLAGS = (
    "model",
    "backbone",
    "backbone_weights",
    "epochs",
    "batch_size",
    "lr",
    "img_size",
    "optimizer",
    "weight_decay",
    "warmup_epochs",
    "patience",
    "val_split",
    "augment",
    "flip",
    "seed",
    "device",
    "workers",
    "quiet",
)


def _train_task(args: argparse.Namespace, extra: dict, train: Callable, resume: Callable) -> dict:
    """`segment train` / `detect train`: a new run from DIR, or --resume RUN."""
    if args.resume:
        return resume(Path(args.resume), args.device, args.quiet)
    _require_data_and_out(args)
    return train(args.data, args.out, **_task_settings(args, extra, TASK_TRAIN_FLAGS))


def cmd_segment(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab import segment

    if args.action == "train":
        result = _train_task(args, extra, segment.segment_train, segment.segment_resume)
    elif args.action == "eval":
        result = segment.segment_eval(Path(args.run), args.data, device=args.device or "auto")
    else:
        result = segment.segment_predict(
            Path(args.run), [Path(p) for p in args.images], args.out or ".", args.device or "auto"
        )
    if args.action == "predict" and args.format != "json":
        for item in result:
            print(f"{item['file']}: mask {item['mask']}, overlay {item['overlay']}")
    else:
        _print_report(result, args.format)
    return 0


def cmd_detect(args: argparse.Namespace, extra: dict) -> int:
    from cnnlab import detect

    if args.action == "train":
        result = _train_task(args, extra, detect.detect_train, detect.detect_resume)
    elif args.action == "eval":
        threshold = args.score_threshold if args.score_threshold is not None else 0.001
        result = detect.detect_eval(Path(args.run), args.data, threshold, args.device or "auto")
    else:
        threshold = args.score_threshold if args.score_threshold is not None else 0.25
        result = detect.detect_predict(
            Path(args.run),
            [Path(p) for p in args.images],
            threshold,
            args.out,
            args.device or "auto",
        )
    if args.action == "predict" and args.format != "json":
        for item in result:
            found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in item["detections"])
            print(f"{item['file']}: {found or 'nothing'}")
    else:
        _print_report(result, args.format)
    return 0


def _require_data_and_out(args: argparse.Namespace) -> None:
    if not args.data or not args.out:
        raise CnnlabError(f"{args.command} train needs DIR and --out RUN (or --resume RUN)")


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Build, inspect and train the classic convolutional networks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str, **kw) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, **kw)
        sub.set_defaults(handler=handler)
        return sub

    def fmt(sub: argparse.ArgumentParser, choices=("table", "json")) -> None:
        sub.add_argument("--format", choices=choices, default=choices[0])

    sub = add("models", cmd_models, "list every registered model")
    fmt(sub)

    sub = add(
        "summary",
        cmd_summary,
        "per-layer output shape, parameters (with formula), MACs and receptive field",
    )
    sub.add_argument("model", help="a registered model name (see `cnnlab models`)")
    sub.add_argument("--input", help="C,H,W (default: the model's natural input)")
    sub.add_argument("--num-classes", type=int)
    sub.add_argument("--depth", type=int, help="expand containers this deep (default: all)")
    fmt(sub)
    sub.set_defaults(model_args_from="model")

    data = add("data", None, "make, check and clean image folders")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    def add_data(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = data_commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    sub = add_data("digits", cmd_data_digits, "write scikit-learn's 1,797 digits as PNG folders")
    sub.add_argument("dst")
    sub.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    sub = add_data("check", cmd_data_check, "counts, sizes, unreadable files and duplicates")
    sub.add_argument("dir")
    fmt(sub, ("text", "json"))
    sub = add_data("shapes", cmd_data_shapes, "synthetic shapes for segmentation or detection")
    sub.add_argument("dst")
    sub.add_argument("--task", choices=("segment", "detect"), required=True)
    sub.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    sub.add_argument("--size", type=int, default=128, help="image side (default 128)")
    sub.add_argument("--seed", type=int, default=0)
    sub = add_data("clean", cmd_data_clean, "copy a class-folder tree into a clean new folder")
    sub.add_argument("src")
    sub.add_argument("dst")
    sub.add_argument(
        "--strip-prefix",
        default=r"^n\d+[-_]",
        help="regex removed from class folder names (default: WordNet ids like n02085620-)",
    )
    fmt(sub, ("text", "json"))

    sub = add("train", cmd_train, "train a classifier on a folder of class folders")
    sub.add_argument("data", nargs="?", metavar="DIR", help="class folders, or train/ val/ test/")
    sub.add_argument("--out", help="the run folder to create")
    sub.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    sub.add_argument(
        "--model",
        default="resnet18",
        help="registered model name; builder arguments pass through, e.g. --cdims 32,64",
    )
    sub.add_argument("--weights", help="initial weights: a .pth/.safetensors file or torchvision")
    sub.add_argument(
        "--freeze-backbone",
        action="store_true",
        default=None,
        help="train only the classifier head (backbone BatchNorm statistics frozen too)",
    )
    sub.add_argument(
        "--backbone-lr-mult", type=float, help="backbone lr = lr x this (e.g. 0.1); head: lr"
    )
    sub.add_argument("--epochs", type=int)
    sub.add_argument(
        "--batch-size",
        type=int,
        help="images per optimizer step; under torchrun, over all processes together",
    )
    sub.add_argument("--lr", type=float)
    sub.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    sub.add_argument("--weight-decay", type=float)
    sub.add_argument("--warmup-epochs", type=int)
    sub.add_argument("--grad-clip", type=float)
    sub.add_argument("--img-size", type=int)
    sub.add_argument("--in-channels", type=int, choices=(1, 3))
    sub.add_argument("--augment", choices=("none", "light", "strong"))
    sub.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        default=None,
        help="no horizontal flips (digits, text)",
    )
    sub.add_argument("--label-smoothing", type=float)
    sub.add_argument("--patience", type=int, help="early stopping on validation top-1")
    sub.add_argument("--val-split", type=float)
    sub.add_argument("--test-split", type=float)
    sub.add_argument("--balance", choices=("none", "weights", "sampler"))
    sub.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"))
    sub.add_argument("--seed", type=int)
    sub.add_argument("--device", help="auto | cpu | cuda")
    sub.add_argument("--workers", type=int)
    sub.add_argument("--quiet", action="store_true", default=None)
    fmt(sub, ("text", "json"))
    sub.set_defaults(model_args_from="model")

    sub = add(
        "lr-find",
        cmd_lr_find,
        "learning-rate range test: loss while the lr grows exponentially, and a suggested lr",
    )
    sub.add_argument("data", metavar="DIR", help="class folders, or train/ val/ test/")
    sub.add_argument("--out", default=".", help="folder for lr_find.png, or a .png path")
    sub.add_argument("--model", default="resnet18", help="registered model name, args pass through")
    sub.add_argument("--weights", help="initial weights: a .pth/.safetensors file or torchvision")
    sub.add_argument("--freeze-backbone", action="store_true", default=None)
    sub.add_argument("--backbone-lr-mult", type=float)
    sub.add_argument("--start-lr", type=float, default=1e-7)
    sub.add_argument("--end-lr", type=float, default=10.0)
    sub.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    for flag, kind in (("--batch-size", int), ("--weight-decay", float), ("--img-size", int)):
        sub.add_argument(flag, type=kind)
    sub.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    sub.add_argument("--in-channels", type=int, choices=(1, 3))
    sub.add_argument("--augment", choices=("none", "light", "strong"))
    sub.add_argument("--no-flip", dest="flip", action="store_false", default=None)
    sub.add_argument("--seed", type=int)
    sub.add_argument("--device", help="auto | cpu | cuda")
    sub.add_argument("--workers", type=int)
    sub.add_argument("--quiet", action="store_true", default=None)
    fmt(sub, ("text", "json"))
    sub.set_defaults(model_args_from="model")

    sub = add("eval", cmd_eval, "evaluate a run on its test split or on another folder")
    sub.add_argument("run")
    sub.add_argument("dir", nargs="?")
    sub.add_argument("--split", default="test", choices=("train", "val", "test"))
    sub.add_argument("--device", default="auto")
    fmt(sub, ("text", "json"))

    sub = add("predict", cmd_predict, "top-k classes for images or folders of images")
    sub.add_argument("run")
    sub.add_argument("paths", nargs="+", metavar="PATH")
    sub.add_argument("--topk", type=int, default=5)
    sub.add_argument("--device", default="auto")
    fmt(sub, ("text", "json"))

    sub = add("demo", cmd_demo, "the built-in job: train the notes' ConvNet on the digits")
    sub.add_argument("--task", choices=("classify", "segment", "detect"), default="classify")
    sub.add_argument("--out", help="run folder (default runs/demo, runs/demo2, ...)")
    sub.add_argument("--quiet", action="store_true")
    sub = add("heatmap", cmd_heatmap, "where a classification run sees each class, as a map")
    sub.add_argument("run")
    sub.add_argument("image")
    sub.add_argument("--class", dest="class_name", help="class to map (default: highest peak)")
    sub.add_argument("--out", help="write the map over the image to this PNG")
    sub.add_argument("--device", default="cpu")
    fmt(sub, ("text", "json"))

    for task, handler, default_model in (
        ("segment", cmd_segment, "fcn8s"),
        ("detect", cmd_detect, "yolov1"),
    ):
        group = add(task, None, f"{task}: train, evaluate and predict")
        actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
        sub = actions.add_parser("train", help=f"train a {task} model")
        sub.set_defaults(handler=handler, model_args_from="model")
        sub.add_argument("data", nargs="?", metavar="DIR")
        sub.add_argument("--out", help="the run folder to create")
        sub.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
        sub.add_argument("--model", default=default_model)
        sub.add_argument("--backbone", help="zoo backbone (default resnet18)")
        sub.add_argument("--backbone-weights", help="a weight file or torchvision")
        for flag, kind in (
            ("--epochs", int),
            ("--batch-size", int),
            ("--lr", float),
            ("--img-size", int),
            ("--weight-decay", float),
            ("--warmup-epochs", int),
            ("--patience", int),
            ("--val-split", float),
            ("--seed", int),
            ("--workers", int),
        ):
            sub.add_argument(flag, type=kind)
        sub.add_argument("--optimizer", choices=("adamw", "sgd"))
        augments = ("none", "light") if task == "detect" else ("none", "light", "strong")
        sub.add_argument("--augment", choices=augments, help="training augmentation")
        sub.add_argument("--no-flip", dest="flip", action="store_false", default=None)
        sub.add_argument("--device")
        sub.add_argument("--quiet", action="store_true", default=None)
        fmt(sub, ("text", "json"))
        for action, help_text in (("eval", "evaluate a run"), ("predict", "run it on images")):
            sub = actions.add_parser(action, help=f"{task}: {help_text}")
            sub.set_defaults(handler=handler)
            sub.add_argument("run")
            if action == "eval":
                sub.add_argument("data", nargs="?", metavar="DIR")
            else:
                sub.add_argument("images", nargs="+", metavar="IMAGE")
                sub.add_argument("--out", help="folder for the drawn results")
            if task == "detect":
                sub.add_argument("--score-threshold", type=float)
            sub.add_argument("--device")
            fmt(sub, ("text", "json"))
    return parser


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    try:
        model_name = getattr(args, getattr(args, "model_args_from", ""), None)
        if unknown and not model_name:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        extra = _model_args(unknown, model_name) if model_name else {}
        return args.handler(args, extra)
    except CnnlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
