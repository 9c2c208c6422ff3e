"""The parser of every command, built from the declarations: the training flags from
``TrainConfig``, each task's commands and prediction options from ``cnnlab.tasks.TASKS``,
the shared flags from one helper each (``cnnlab.cli.flags``). Each group of commands
declares its parsers beside the module of its handlers (``cnnlab.cli.*_parsers`` beside
``cnnlab.cli.*_commands``); this module puts them in the order ``cnnlab --help`` lists."""

from __future__ import annotations

import argparse

from cnnlab.cli.data_parsers import add_data_commands
from cnnlab.cli.deploy_parsers import (
    add_benchmark_command,
    add_explore_command,
    add_export_command,
    add_serve_command,
)
from cnnlab.cli.explain_parsers import (
    add_explain_command,
    add_features_command,
    add_heatmap_command,
)
from cnnlab.cli.flags import Parser, add_command
from cnnlab.cli.inspect_parsers import add_inspect_commands
from cnnlab.cli.train_parsers import (
    add_cv_command,
    add_demo_command,
    add_lr_find_command,
    add_task_commands,
)
from cnnlab.tasks import TASKS


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
    add_inspect_commands(commands)
    add_data_commands(commands)
    for entry in TASKS.values():
        group = commands
        if entry.command:
            holder = add_command(
                commands, entry.command, None, f"{entry.name}: train, evaluate and predict"
            )
            group = holder.add_subparsers(dest="action", required=True, metavar="ACTION")
        add_task_commands(group, entry)
    for add in (
        add_cv_command,
        add_lr_find_command,
        add_export_command,
        add_benchmark_command,
        add_demo_command,
        add_heatmap_command,
        add_explain_command,
        add_features_command,
        add_explore_command,
        add_serve_command,
    ):
        add(commands)
    return parser
