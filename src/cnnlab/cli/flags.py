"""The command line's flags, each kind made in one place: the training flags generated
from ``TrainConfig``'s fields, a task's prediction options from its declaration
(``cnnlab.tasks.TASKS``), the options every non-training command shares (``--format``,
``--device``, ``--backend``, ``--overwrite``) and the web page's upload limits (``serve``,
``explore``); the model builder's pass-through arguments; the parser that makes a usage
error one line, and ``add_command``, which each ``cli/*_parsers.py`` declares its commands
with; and the values of the flags the handlers read themselves (``--kwargs``,
``--max-memory``; ``--input`` is ``cnnlab.inspect.specs.parse_input_size``)."""

from __future__ import annotations

import argparse
import functools
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from cnnlab.errors import CnnlabError
from cnnlab.tasks import TASKS, TaskEntry
from cnnlab.tasks.options import options_for

EXPLICIT_NONE = object()  # `--grad-clip none`: an explicit None, not an unset flag


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


def builder_args(extra: Sequence[str], model: str, command: str = "cnnlab") -> dict:
    """Turn unknown ``--key value`` pairs into keyword arguments the model's builder takes
    (``ModelInfo.options``); an on/off setting (a bool default) also reads as ``--key`` or
    ``--no-key``. An error names ``command`` (``cnnlab summary``) and says whether the
    flag is a training setting (one ``command`` has no use for) or no argument of
    ``model``'s."""
    from cnnlab.config import TrainConfig
    from cnnlab.models.factory import model_info

    options = model_info(model).options

    def is_switch(name: str) -> bool:
        return isinstance(options.get(name), bool)

    args: dict = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            raise CnnlabError(f"{command}: unexpected argument {token!r}")
        flag, _, value = token[2:].partition("=")
        key = flag.replace("-", "_")
        if not value and (not tokens or tokens[0].startswith("--")):
            if is_switch(key):
                args[key] = True
                continue
            if key.startswith("no_") and is_switch(key[3:]):
                args[key[3:]] = False
                continue
            raise CnnlabError(f"{command}: --{flag} needs a value")
        args[key] = parse_value(value or tokens.pop(0))
    settings = {f.name for f in fields(TrainConfig) if f.metadata.get("cli", True)}
    for key in args:
        if key in options or key == "num_classes":  # the data decides; train checks
            continue
        flag = f"--{key.replace('_', '-')}"
        if key in settings:
            raise CnnlabError(
                f"{command} has no use for {flag}: a training setting (`cnnlab train --help`),"
                f" not one of {model}'s own flags"
            )
        known = ", ".join(f"--{n.replace('_', '-')}" for n in options) or "none"
        raise CnnlabError(f"{command}: {model} does not take {flag} (it takes: {known})")
    return args


def models_help(task: str | None) -> str:
    """The epilog of a train command (the task's models and each one's own flags, from the
    builders' signatures in the model registry), or with ``task`` None of ``summary``:
    every model, and every builder flag (``--img-size`` included)."""
    from cnnlab.config import TrainConfig
    from cnnlab.models.factory import list_models, model_info

    config_flags = {f.name for f in fields(TrainConfig)} if task is not None else set()
    wrap = functools.partial(_wrap, width=78)
    named = "--model" if task is not None else "MODEL"
    lines = [*wrap(f"models ({named}): {', '.join(list_models(task=task))}".split(" "), ""), ""]
    lines.append("model flags (after MODEL, e.g. convnet --cdims 32,64 --hdims 1024,128):")
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


def config_flags(
    sub: argparse.ArgumentParser, task: str, unused: Mapping[str, str] | None = None
) -> None:
    """One flag per TrainConfig field that ``task`` takes, with its help, choices and
    ``task``'s default. A field only other tasks take, or one of ``unused`` (the fields
    this command has no use for, each with why), is refused in argparse's one line
    (``RefusedFlag``) and not listed."""
    unused = unused or {}
    from cnnlab.config import TrainConfig, choices_of, default_of

    hints = typing.get_type_hints(TrainConfig)
    for item in fields(TrainConfig):
        if not item.metadata.get("cli", True):
            continue
        flag = f"--{item.name.replace('_', '-')}"
        takers = item.metadata.get("tasks") or (task,)
        if task not in takers or item.name in unused:
            if task not in takers:
                commands = " and ".join(f"`cnnlab {TASKS[t].prefix()}train`" for t in takers)
                reason = f"only {commands} take{'s' if len(takers) == 1 else ''} it"
                if task in item.metadata["instead"]:
                    reason += f"; {item.metadata['instead'][task]}"
            else:
                reason = f"`{sub.prog}` has no use for it ({unused[item.name]})"
            spellings = (flag, f"--no-{flag[2:]}") if hints[item.name] is bool else (flag,)
            sub.add_argument(
                *spellings,
                action=RefusedFlag,
                reason=reason,
                nargs="?",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
            continue
        default = default_of(task, item.name)
        help_text = f"{item.metadata['help']} (default: {default})"
        options = typing.get_args(hints[item.name]) or (hints[item.name],)
        kind = next(t for t in options if t is not type(None))
        if kind is bool:
            sub.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = choices_of(task, item.name)
        parse = _optional(kind) if type(None) in options else kind
        sub.add_argument(flag, type=parse, choices=choices, help=help_text)


class RefusedFlag(argparse.Action):
    """A training flag this command does not take (only other tasks take it, or the
    command has no use for it): not listed in --help, and refused in argparse's one line
    saying why, rather than passed on to the model builder as an argument of the model's
    own (which would name the model, not the command, as what does not take it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.reason = reason

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"argument {option_string}: {self.reason}")


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return EXPLICIT_NONE if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def positive(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


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


Group = Any  # argparse's subparsers action (a private class)


def add_command(
    group: Group,
    name: str,
    handler: Callable | None,
    help_text: str,
    epilog_of: Callable[[], str] | None = None,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """A command ``name`` in ``group``: its help, its handler (``cnnlab.cli.*_commands``;
    None for a group of its own) and the values ``defaults`` sets in its namespace (and
    ``command_line``, what the command is called: ``cnnlab segment train``)."""
    sub = group.add_parser(name, help=help_text, description=help_text, epilog_of=epilog_of)
    sub.set_defaults(handler=handler, command_line=sub.prog, **defaults)
    return sub


# ---------------------------------------------------------------------------- shared flags


def add_format(sub: argparse.ArgumentParser, choices: tuple[str, ...] = ("text", "json")) -> None:
    """``--format``: the human form first (the default), ``json`` one JSON document."""
    sub.add_argument(
        "--format", choices=choices, default=choices[0], help="json: one JSON document"
    )


def add_device(sub: argparse.ArgumentParser) -> None:
    from cnnlab.config import TrainConfig

    help_text = next(f for f in fields(TrainConfig) if f.name == "device").metadata["help"]
    sub.add_argument("--device", default="auto", help=help_text)


def add_backend(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "onnxruntime-int8"),
        default="torch",
        help="onnxruntime: run RUN/model.onnx (`cnnlab export RUN`) on the CPU;"
        " onnxruntime-int8: RUN/model.int8.onnx (`cnnlab export RUN --int8`)",
    )


def add_compile(sub: argparse.ArgumentParser) -> None:
    from cnnlab.config import COMPILE_SETTINGS

    sub.add_argument(
        "--compile",
        choices=COMPILE_SETTINGS,
        default="auto",
        help="torch.compile the model (inductor) on its first batch; auto: not for a"
        " command's images, which never paid back the compile time (docs/speed.md);"
        " a model that fails to compile runs eagerly",
    )


def add_batch(sub: argparse.ArgumentParser, default: int | None, what: str) -> None:
    """``--batch N``: the batch size ``what`` is estimated at (a whole number, at least 1)."""
    sub.add_argument("--batch", type=positive, default=default, metavar="N", help=what)


def add_overwrite(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_upload_limits(sub: argparse.ArgumentParser) -> None:
    """What one request to the web page may bring and cost (``serve``, ``explore``):
    ``--max-upload-mb``, ``--upload-timeout``, ``--max-memory``; ``upload_limits`` reads
    them."""
    sub.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest image file, in megabytes"
    )
    sub.add_argument(
        "--upload-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time for an upload to arrive, from its headers (default 30)",
    )
    sub.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="most memory one request (a prediction, a layer's maps) may need, e.g. 2GB"
        " (default: half the memory free at start over the workers, at most 4 GiB)",
    )


def upload_limits(args: argparse.Namespace) -> dict[str, Any]:
    """``add_upload_limits``' flags as ``cnnlab.serve.serve``'s keywords: ``max_upload``
    and ``max_memory`` in bytes, ``upload_timeout`` in seconds (the server checks it)."""
    if not args.max_upload_mb > 0:  # also refuses nan
        raise CnnlabError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    return {
        "max_upload": int(args.max_upload_mb * 1000 * 1000),
        "upload_timeout": args.upload_timeout,
        "max_memory": memory_limit(args.max_memory),
    }


def add_task_options(sub: argparse.ArgumentParser, entry: TaskEntry, command: str) -> None:
    """One flag per prediction option ``entry``'s task declares for ``command``: its type
    and range checked by the declaration itself, its default in the help."""
    for option in options_for(entry.options, command):
        if option.type is bool:
            sub.add_argument(option.flag, action="store_true", help=escape(option.help))
            continue
        limits = option.range_text()
        sub.add_argument(
            option.flag,
            type=_argument_type(option.parse),
            metavar=option.name.upper(),
            help=f"{escape(option.help)}{f', {limits}' if limits else ''}"
            f" (default: {option.default_in(command):g})",
        )


def escape(text: str) -> str:
    """``text`` as argparse help, where % starts a format."""
    return text.replace("%", "%%")


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError as argparse's own message (``argument --topk: topk
    must be at least 1, got 0``)."""

    def argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return argument


# ---- the values of flags that the handlers read ----------------------------------------


def parse_kwargs(text: str | None) -> dict:
    """``--kwargs``: a JSON object of the model builder's keyword arguments ({} unset)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CnnlabError(f"--kwargs {text!r}: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise CnnlabError(f"--kwargs {text!r}: expected a JSON object of keyword arguments")
    return value


def memory_limit(text: str | None) -> int | None:
    """``--max-memory`` (``8GB``, ``512MiB``) in bytes; None unset."""
    if text is None:
        return None
    from cnnlab.inspect.memory import parse_bytes

    return parse_bytes(text)
