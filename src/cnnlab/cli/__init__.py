"""The ``cnnlab`` command: parses arguments, calls the Python API, prints the result.

Every command that reports numbers takes ``--format json`` and then prints exactly one JSON
document on stdout; tables and progress go to the terminal (progress on stderr). A
``CnnlabError`` becomes one line on stderr and exit status 2, and so does a file-system
error (a full disk, a read-only folder: the path and what to do). SIGTERM stops a command
as Ctrl-C does: what it was writing is removed, and it exits with status 130. The training flags are
generated from ``TrainConfig``'s fields; the three tasks share one set of train, eval and
predict commands (``cnnlab train``, ``cnnlab segment train``, ``cnnlab detect train``, ...).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from cnnlab.cli.flags import builder_args
from cnnlab.cli.parsing import build_parser
from cnnlab.errors import CnnlabError
from cnnlab.files import os_error_line

__all__ = ["build_parser", "builder_args", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    if threading.current_thread() is threading.main_thread():
        # `kill`, a job scheduler or a container stop: clean up as for Ctrl-C (staged
        # folders and temporary files are removed on the way out) instead of dying at once.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Unknown flags are the model builder's arguments (--cdims 32,64); the user's own
        # model (a spec with ":") takes --kwargs instead.
        source = getattr(args, "model_args_from", None)
        model_name = getattr(args, source, None) if source else None
        if source and model_name is None and not getattr(args, "resume", None):
            from cnnlab.config import default_of

            model_name = default_of(args.task, "model")
        if model_name and ":" in model_name:
            model_name = None
        command = getattr(args, "command_line", parser.prog)
        if unknown and not model_name:  # argparse's line, naming the command's own --help
            parser.exit(
                2, f"error: unrecognized arguments: {' '.join(unknown)} (see `{command} --help`)\n"
            )
        extra = builder_args(unknown, model_name, command) if model_name and unknown else {}
        return args.handler(args, extra)
    except CnnlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`cnnlab summary vgg16 | head`): the rest is not wanted. Whatever
        # Python still holds for stdout goes nowhere, so its flush at exit cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that stopped there
    except OSError as error:
        # A full disk, a read-only folder, a folder moved away mid-run: every write is
        # atomic (cnnlab.files), so nothing half-written is left to mention.
        print(f"error: {os_error_line(error)}", file=sys.stderr)
        return 2


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
