"""The one list of tasks (``TASKS``): what classification, segmentation and detection are
called, where each is implemented, its command-line prefix, its training defaults and its
prediction options. Adding a task is one ``TaskEntry`` here and one module beside it.

Each module (``classify.py``, ``segment.py``, ``detect.py``) holds a class implementing
both contracts: training (``cnnlab.engine.task.TrainingTask``, what the loop calls) and
inference (``cnnlab.tasks.inference.InferenceTask``, what ``load_run``, the web page and
export call). A mode of a task is a class of its own that the task's class hands over to
from ``setup`` and ``from_meta`` (classification's multi-label mode: ``multilabel.py``, its
shared part in ``classify_base.py``); it has no entry here. This file stays light (no
torch): the command line reads it to build its parser.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from cnnlab.errors import CnnlabError
from cnnlab.tasks.options import Option


@dataclass(frozen=True)
class TaskEntry:
    """One task: its name (model.json's ``"task"``, ``ModelInfo.task``) and what every
    consumer needs to know of it before its module is imported."""

    name: str
    module: str  # holds ``TASK``, the class implementing both contracts
    command: str  # "cnnlab COMMAND train|eval|predict"; "" for the top-level commands
    noun: str  # "train a classifier"
    splits: tuple[str, ...]  # what `eval --split` may name
    eval_split: str  # what `cnnlab eval RUN` reports on by default
    # TrainConfig values that differ from classification's (``cnnlab.config.make_config``).
    defaults: dict[str, Any] = field(default_factory=dict)
    options: tuple[Option, ...] = ()  # prediction options (``cnnlab.tasks.options``)
    predict_folder: str | None = None  # where `predict` draws when --out is not given
    tools: tuple[str, ...] = ()  # commands beside train/eval/predict (``cli.train_parsers``)

    def prefix(self) -> str:
        """``"segment "`` in ``cnnlab segment train``; ``""`` for classification."""
        return f"{self.command} " if self.command else ""


TASKS: dict[str, TaskEntry] = {
    entry.name: entry
    for entry in (
        TaskEntry(
            name="classify",
            module="cnnlab.tasks.classify",
            command="",
            noun="a classifier",
            splits=("train", "val", "test"),
            eval_split="test",
            options=(
                Option("topk", int, 5, "classes listed per image", ("predict", "serve"), 1),
                Option(
                    "tta",
                    bool,
                    False,
                    "average each image's class probabilities with its mirror image (when"
                    " the run trained with flips) and a 90% centre zoom (when it trained with"
                    " crops)",
                    ("predict", "eval"),
                    at_load=True,
                ),
                Option(
                    "heatmaps",
                    bool,
                    False,
                    "the probability map of each top class (`cnnlab heatmap`'s windows)",
                    ("serve",),
                ),
                Option(
                    "explain",
                    bool,
                    False,
                    "where the top class's evidence lies: its Grad-CAM (`cnnlab explain`)",
                    ("serve",),
                ),
            ),
        ),
        TaskEntry(
            name="segment",
            module="cnnlab.tasks.segment",
            command="segment",
            noun="a segmentation model",
            splits=("train", "val"),
            eval_split="val",
            # Longer training in smaller batches; no test split (the validation split reports).
            defaults={
                "model": "fcn8s",
                "model_args": {"backbone": "resnet18"},
                "epochs": 30,
                "batch_size": 16,
                "test_split": 0.0,
            },
            predict_folder="predictions",
        ),
        TaskEntry(
            name="detect",
            module="cnnlab.tasks.detect",
            command="detect",
            noun="a detector",
            splits=("train", "val"),
            eval_split="val",
            # YOLOv1's weight decay, a looser clip for the summed detection losses, 20%
            # validation, colour inputs (grayscale files are converted).
            defaults={
                "model": "yolov1",
                "model_args": {"backbone": "resnet18"},
                "epochs": 30,
                "batch_size": 16,
                "weight_decay": 5e-4,
                "grad_clip": 10.0,
                "val_split": 0.2,
                "test_split": 0.0,
                "in_channels": 3,
            },
            options=(
                Option(
                    "score_threshold",
                    float,
                    0.25,
                    "keep boxes scoring at least this",
                    ("predict", "eval", "serve"),
                    0.0,
                    1.0,
                    # mAP needs the low-scoring boxes too (COCO's evaluation keeps them).
                    # The same as cnnlab.models.detection's PREDICT_LIMITS and EVAL_LIMITS,
                    # which this light list cannot import (tests/tasks/test_contracts.py).
                    defaults={"eval": 0.001},
                ),
            ),
            tools=("proposals",),
        ),
    )
}


def entry(name: str) -> TaskEntry:
    """The entry of task ``name``; an unknown name lists the known ones."""
    if name not in TASKS:
        raise CnnlabError(f"unknown task {name!r} ({', '.join(TASKS)})")
    return TASKS[name]


def task_class(name: str) -> Any:
    """The class implementing task ``name`` (imported on first use)."""
    return importlib.import_module(entry(name).module).TASK
