"""The model registry, a leaf every module may import: ``register_model`` records each
builder with what other code needs to know about its model as data (``ModelInfo``, as
timm's ``pretrained_cfg``): its task, minimum input size, classifier head and how the head
reads the features, and its first convolution. ``lookup`` and ``registered`` see what is
registered so far; ``cnnlab.models.factory`` (``create_model``, ``list_models``,
``model_info``) has every family imported first, as timm's ``_registry`` / ``_factory``.
"""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cnnlab.errors import CnnlabError, InputSizeError

POOLS = ("avg", "flatten")


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before building it."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # the file it lives in: "resnet", "vgg", ...
    task: str  # a name of cnnlab.tasks.TASKS ("classify", "segment", "detect")
    min_size: int  # smallest H and W the forward pass accepts (a built model may know better)
    input_size: tuple[int, int, int]  # natural (C, H, W), used by summaries and `cnnlab models`
    torchvision: str | None  # torchvision builder with an identical state_dict, if any
    # The modules after ``forward_features``, in the order ``forward_head`` applies them
    # (a Flatten is implied where a Linear follows a map). "avg": the head starts with a
    # global average pool (a module named in ``head`` or a functional one); "flatten": it
    # flattens a map of fixed size (an adaptive pool in ``head`` sets that size).
    head: tuple[str, ...] = ()
    pool: str | None = None
    # Modules whose outputs are class scores (sized by num_classes): replaced for transfer
    # learning, trained alone by freeze_backbone, removed when the model becomes a backbone.
    classifier: tuple[str, ...] = ()
    first_conv: str | None = None  # adapted to the number of input channels on weight loading
    # The last convolutional stage, as ``cnnlab summary`` names it: where ``cnnlab explain``
    # reads class activation maps by default (the map just before the head reads it).
    explain_layer: str | None = None
    parameters: frozenset[str] = field(default=frozenset(), repr=False)  # the builder's

    @property
    def takes_img_size(self) -> bool:
        """Whether the builder fixes the input size (the ConvNet's first linear layer)."""
        return "img_size" in self.parameters

    @property
    def options(self) -> dict[str, Any]:
        """The settings a user may pass the builder, beyond num_classes and in_channels, with
        their defaults: its own keyword parameters and, where it hands ``**kwargs`` on to
        the model class it returns, that class's parameters after ``in_channels`` (those
        before are the architecture the builder fixes, as ResNet's block and depths).
        Callables (a norm layer) are left out: no command line can name one."""
        own = inspect.signature(self.builder).parameters
        found = {
            name: p.default
            for name, p in own.items()
            if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY
        }
        model_class = typing.get_type_hints(self.builder).get("return")
        takes_any = any(p.kind is p.VAR_KEYWORD for p in own.values())
        if takes_any and isinstance(model_class, type):
            params = list(inspect.signature(model_class.__init__).parameters.items())
            names = [name for name, _ in params]
            after = names.index("in_channels") + 1 if "in_channels" in names else len(names)
            hints = typing.get_type_hints(model_class.__init__)
            for name, p in params[after:]:
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or _is_callable(hints.get(name)):
                    continue
                found.setdefault(name, p.default)
        return {k: v for k, v in found.items() if k not in ("num_classes", "in_channels")}


def _is_callable(hint: Any) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
    return any(
        typing.get_origin(option) is collections.abc.Callable or option is Callable
        for option in options
    )


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *,
    min_size: int,
    input_size: tuple[int, int, int] = (3, 224, 224),
    torchvision: str | None = None,
    task: str = "classify",
    head: tuple[str, ...] = (),
    pool: str | None = None,
    classifier: tuple[str, ...] = (),
    first_conv: str | None = None,
    explain_layer: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under its function name; refuses duplicate names."""
    if pool not in (None, *POOLS):
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(
            name=name,
            builder=builder,
            family=builder.__module__.rsplit(".", 1)[-1],
            task=task,
            min_size=min_size,
            input_size=input_size,
            torchvision=torchvision,
            head=head,
            pool=pool,
            classifier=classifier,
            first_conv=first_conv,
            explain_layer=explain_layer,
            parameters=frozenset(inspect.signature(builder).parameters),
        )
        return builder

    return decorator


def lookup(name: str) -> ModelInfo:
    """The entry registered as ``name``; an unknown name suggests close ones. Only what is
    registered so far: ``cnnlab.models.factory.model_info`` has every family imported."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `cnnlab models`"
        raise CnnlabError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def registered(pattern: str = "*", task: str | None = None) -> list[str]:
    """The names registered so far that match a shell-style pattern (and ``task``), sorted."""
    return sorted(
        name
        for name, info in _REGISTRY.items()
        if fnmatch.fnmatch(name, pattern) and (task is None or info.task == task)
    )


def info_of(model: nn.Module) -> ModelInfo | None:
    """The registry entry a model was built from (None for a model built by hand)."""
    name = getattr(model, "model_name", None)
    return _REGISTRY.get(name) if isinstance(name, str) else None


def check_input_size(model: nn.Module, height: int, width: int, what: str = "inputs") -> None:
    """InputSizeError unless ``model`` accepts ``height`` x ``width`` inputs: at least its
    ``min_input_size``, and exactly its ``fixed_input_size`` when it has one."""
    name = getattr(model, "model_name", type(model).__name__)
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None and (height, width) != tuple(fixed):
        raise InputSizeError(
            f"{name} was built for {fixed[0]}x{fixed[1]} {what}, got {height}x{width}"
            " (rebuild it with img_size=... to change)"
        )
    minimum = getattr(model, "min_input_size", 1)
    if height < minimum or width < minimum:
        raise InputSizeError(
            f"{name} needs {what} of at least {minimum}x{minimum}, got {height}x{width}"
        )


def classifier_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's classifier modules by name (``ModelInfo.classifier``; absent ones, like
    GoogLeNet's auxiliary heads when they are off, are left out)."""
    info = info_of(model)
    names = info.classifier if info is not None else ()
    found = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Module):
            found[name] = module
    return found
