"""One module per task: what classification, segmentation and detection mean for training
(targets, loss, metric, report, plots) and for a finished run (prediction, evaluation).

The model's registry entry names its task; ``task_class`` finds the implementation, so the
loop, the run loader and the CLI never name a task themselves.
"""

from __future__ import annotations

import importlib
from typing import Any

from cnnlab.errors import CnnlabError

_MODULES = {
    "classify": "cnnlab.tasks.classify",
    "segment": "cnnlab.tasks.segment",
    "detect": "cnnlab.tasks.detect",
}


def task_class(name: str) -> Any:
    """The task class for model.json's ``"task"`` (imported on first use)."""
    if name not in _MODULES:
        raise CnnlabError(f"unknown task {name!r} ({', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).TASK
