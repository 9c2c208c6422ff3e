"""``train`` and ``resume`` as the public API and the command line call them: the settings
over the task's defaults, the task resolved from the model's registry entry (or the run's
model.json), then the engine (``cnnlab.engine``), which is handed the task and names none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab import checkpoint, engine
from cnnlab.config import TrainConfig, default_of, make_config
from cnnlab.errors import CnnlabError
from cnnlab.models.factory import model_info
from cnnlab.tasks import task_class


def train(
    cfg: TrainConfig | str | Path,
    out: str | Path | None = None,
    *,
    task: str | None = None,
    **settings: Any,
) -> dict:
    """Train into the new run folder ``cfg.out`` and return the final report
    (``cnnlab.engine.loop.train`` says what the folder receives).

    ``cfg`` is a TrainConfig, or the data folder with ``out`` and TrainConfig fields as
    ``settings`` (``train("data/dogs", "runs/dogs", model="resnet18", epochs=20)``), over
    the task's defaults (``cnnlab.tasks.TASKS``). The model's registry entry decides the
    task; with ``task`` given, a model of another task is refused.
    """
    if not isinstance(cfg, TrainConfig):
        if out is None:
            raise CnnlabError("train needs the data folder and out, the run folder to create")
        model = settings.get("model") or default_of(task or "classify", "model")
        cfg = make_config(task or model_info(model).task, data=str(cfg), out=str(out), **settings)
    elif out is not None or settings:
        raise CnnlabError("train takes a TrainConfig alone, or a data folder with settings")
    return engine.train(cfg, task_of_model(cfg.model, task))


def resume(run_dir: str | Path, task: str | None = None, **overrides: Any) -> dict:
    """Continue the run in ``run_dir`` from its last completed epoch and return the report
    (``cnnlab.engine.loop.resume``). With ``task`` given, a run of another task is
    refused."""
    run_dir = checkpoint.require_run_dir(run_dir)
    meta = checkpoint.read_model_json(run_dir)
    if task is not None and meta.task != task:
        raise CnnlabError(f"{run_dir} holds a {meta.task} run, not a {task} run")
    return engine.resume(run_dir, task_class(meta.task), **overrides)


def task_of_model(model: str, wanted: str | None = None) -> Any:
    """The task class of a registered model (its ``ModelInfo.task``); with ``wanted``, a
    model of another task is refused, naming the command it belongs to."""
    task = model_info(model).task
    if wanted is not None and task != wanted:
        raise CnnlabError(
            f"{model} is a {task} model, not a {wanted} model (`cnnlab models` lists"
            " each model's task)"
        )
    return task_class(task)
