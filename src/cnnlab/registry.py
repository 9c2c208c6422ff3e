"""The model registry: ``register_model`` / ``create_model`` / ``list_models``.

Every model in cnnlab is built through ``create_model``; the CLI, the inspector and the
tests go through it too, so a model registered here is available everywhere.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cnnlab.errors import CnnlabError, InputSizeError


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # the file it lives in: "resnet", "vgg", ...
    min_size: int  # smallest H and W the forward pass accepts
    input_size: tuple[int, int, int]  # natural (C, H, W), used by summaries and `cnnlab models`
    torchvision: str | None  # torchvision builder with an identical state_dict, if any
    task: str  # "classify", "segment" or "detect"


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *,
    min_size: int,
    input_size: tuple[int, int, int] = (3, 224, 224),
    torchvision: str | None = None,
    task: str = "classify",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under its function name; refuses duplicate names."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        family = builder.__module__.rsplit(".", 1)[-1]
        _REGISTRY[name] = ModelInfo(name, builder, family, min_size, input_size, torchvision, task)
        return builder

    return decorator


def _ensure_models_imported() -> None:
    # Importing the package runs every @register_model decorator.
    import cnnlab.models  # noqa: F401


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_models_imported()
    return sorted(
        name
        for name, info in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (task is None or info.task == task)
    )


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; an unknown name suggests close ones."""
    _ensure_models_imported()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `cnnlab models`"
        raise CnnlabError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a registered model, optionally loading weights (a file or ``"torchvision"``).

    ``num_classes`` and ``in_channels`` default to the builder's own (1000 and 3 for the
    ImageNet models). Keyword arguments that are ``None`` are dropped, so CLI defaults never
    override a builder's defaults.
    """
    info = model_info(name)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = info.builder(**kwargs)
    model.model_name = name
    model.min_input_size = getattr(model, "min_input_size", info.min_size)
    model.register_forward_pre_hook(_check_input_size)
    if weights is not None:
        from cnnlab.weights import load_pretrained

        load_pretrained(model, info, weights)
    return model


def _check_input_size(module: nn.Module, args: tuple) -> None:
    """Refuse inputs below the model's minimum with an error naming it."""
    if not args or not hasattr(args[0], "shape") or args[0].dim() < 3:
        return
    height, width = args[0].shape[-2:]
    fixed = getattr(module, "fixed_input_size", None)
    name = getattr(module, "model_name", type(module).__name__)
    if fixed is not None and (height, width) != tuple(fixed):
        raise InputSizeError(
            f"{name} was built for {fixed[0]}x{fixed[1]} inputs, got {height}x{width}"
            " (rebuild it with img_size=... to change)"
        )
    minimum = module.min_input_size
    if height < minimum or width < minimum:
        raise InputSizeError(
            f"{name} needs inputs of at least {minimum}x{minimum}, got {height}x{width}"
        )
