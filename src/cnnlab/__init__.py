"""cnnlab: build, inspect and train the classic convolutional networks."""

from cnnlab.errors import CnnlabError, InputSizeError
from cnnlab.registry import create_model, list_models, model_info, register_model

__all__ = [
    "CnnlabError",
    "InputSizeError",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
__version__ = "0.1.0"
