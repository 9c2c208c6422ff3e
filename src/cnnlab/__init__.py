"""cnnlab: build, inspect and train the classic convolutional networks.

The public API: ``create_model``, ``list_models``, ``model_info`` and ``register_model``
(the zoo), ``summarize`` (the inspector), ``train``, ``resume`` and ``TrainConfig``
(training any task), ``load_run`` (a finished run of any task), ``export_run`` (its model
as ONNX or ``.pt2``, checked against the run) and ``convolutionalize``.
``import cnnlab`` stays light: the training stack is imported on first use.
"""

from importlib import import_module
from typing import Any

# Imported now, not lazily: the function shares its module's name, and a lazy lookup
# would give the module once anything imported ``cnnlab.convolutionalize`` directly.
from cnnlab.convolutionalize import convolutionalize
from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.registry import create_model, list_models, model_info, register_model

__all__ = [
    "CnnlabError",
    "InputSizeError",
    "TrainConfig",
    "convolutionalize",
    "create_model",
    "export_run",
    "list_models",
    "load_run",
    "model_info",
    "register_model",
    "resume",
    "summarize",
    "train",
]
__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "cnnlab.config",
    "export_run": "cnnlab.export",
    "load_run": "cnnlab.runs",
    "resume": "cnnlab.engine.loop",
    "summarize": "cnnlab.inspect",
    "train": "cnnlab.engine.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
