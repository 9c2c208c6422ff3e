"""cnnlab: build, inspect and train the classic convolutional networks."""

from typing import Any

from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.registry import create_model, list_models, model_info, register_model

__all__ = [
    "CnnlabError",
    "InputSizeError",
    "create_model",
    "list_models",
    "load_run",
    "model_info",
    "register_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `cnnlab.load_run` without importing the training stack on `import cnnlab`.
    if name == "load_run":
        from cnnlab.runs import load_run

        return load_run
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
