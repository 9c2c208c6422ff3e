"""cnnlab: build, inspect and train the classic convolutional networks.

The public API: ``create_model``, ``list_models``, ``model_info`` and ``register_model``
(the zoo), ``summarize`` (the inspector), ``train``, ``resume`` and ``TrainConfig``
(training any task), ``load_run`` (a finished run of any task), ``export_run`` (its model
as ONNX or ``.pt2``, checked against the run) and ``convolutionalize``.
``import cnnlab`` stays light: each name is imported on first use, so that a command
which needs no tensors (``cnnlab models`` reading its cache, ``--help``) does not pay for
``import torch``.
"""

from importlib import import_module
from typing import Any

from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.version import __version__

__all__ = [
    "CnnlabError",
    "InputSizeError",
    "TrainConfig",
    "__version__",
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

# convolutionalize lives in cnnlab.dense_to_conv: a module of the function's own name would,
# once imported, shadow the function as the package's attribute.
_LAZY = {
    "TrainConfig": "cnnlab.config",
    "convolutionalize": "cnnlab.dense_to_conv",
    "create_model": "cnnlab.models.factory",
    "list_models": "cnnlab.models.factory",
    "model_info": "cnnlab.models.factory",
    "register_model": "cnnlab.registry",
    "export_run": "cnnlab.export",
    "load_run": "cnnlab.runs",
    "resume": "cnnlab.training",
    "summarize": "cnnlab.inspect",
    "train": "cnnlab.training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
