"""The parsers of the commands that train and use runs: each task's ``train``, ``eval``,
``predict`` (and its tools, ``TASK_TOOLS``), ``cv``, ``lr-find`` and ``demo`` (their
handlers: ``cnnlab.cli.train_commands``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from cnnlab.cli.data_parsers import add_proposals_command
from cnnlab.cli.flags import (
    Group,
    add_backend,
    add_command,
    add_compile,
    add_device,
    add_format,
    add_overwrite,
    add_task_options,
    config_flags,
    models_help,
    positive,
)
from cnnlab.cli.train_commands import (
    DEFAULT_FOLDS,
    cmd_cv,
    cmd_demo,
    cmd_eval,
    cmd_lr_find,
    cmd_predict,
    cmd_train,
)
from cnnlab.tasks import TASKS, TaskEntry

# The commands a task adds beside train, eval and predict (``TaskEntry.tools``).
TASK_TOOLS: dict[str, Callable[[Group], None]] = {"proposals": add_proposals_command}


def add_task_commands(group: Group, entry: TaskEntry) -> None:
    """train, eval and predict of ``entry`` (and detection's proposals)."""
    sub = add_command(
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

    sub = add_command(
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

    sub = add_command(
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


def add_cv_command(commands: Group) -> None:
    """``cv``: cross-validation, a classification run per fold."""
    sub = add_command(
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
    sub.add_argument(
        "--folds", type=positive, help=f"K, the number of folds (default: {DEFAULT_FOLDS})"
    )  # unset (None) so that --resume can refuse it: the folds are dealt already
    sub.add_argument("--resume", metavar="OUT", help="continue an interrupted cross-validation")
    config_flags(
        sub,
        "classify",
        unused={
            "split_file": "it splits DIR into --folds folds itself",
            "multi_label": "it scores single-label classification only",
        },
    )
    add_format(sub)


def add_lr_find_command(commands: Group) -> None:
    """``lr-find``: the learning-rate range test."""
    sub = add_command(
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
    # The range test's own schedule replaces the run's; it saves no model and evaluates none.
    sweep = "the lr grows from --start-lr to --end-lr over --steps optimizer steps"
    unused = dict.fromkeys(("lr", "epochs", "warmup_epochs", "lr_interval"), sweep)
    unused |= dict.fromkeys(
        ("patience", "min_delta"), "it validates nothing; it stops early when the loss diverges"
    )
    unused |= {
        "ema": "its model is thrown away: no average is evaluated or kept",
        "compile": "it runs its steps eagerly",
        "split_file": "it splits DIR as `cnnlab train` would",
    }
    config_flags(sub, "classify", unused)
    add_format(sub)


def add_demo_command(commands: Group) -> None:
    """``demo``: the built-in job."""
    sub = add_command(
        commands, "demo", cmd_demo, "the built-in job: train the notes' ConvNet on the digits"
    )
    sub.add_argument("--task", choices=tuple(TASKS), default="classify")
    sub.add_argument("--out", help="run folder (default runs/demo, runs/demo2, ...)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar, no epoch lines")
