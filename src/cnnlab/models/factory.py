"""The zoo by name: ``create_model``, ``list_models`` and ``model_info`` (timm's
``_factory``). This module is part of ``cnnlab.models``, whose ``__init__`` imports every
family (running their ``@register_model``) before any submodule, so every name is
registered when these run; model files never import this module."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cnnlab.models.builder import build_model
from cnnlab.registry import ModelInfo, lookup, registered


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return registered(pattern, task)


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; an unknown name suggests close ones."""
    return lookup(name)


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
    override a builder's defaults. The model records its name (``model.model_name``) and
    its minimum input side (``model.min_input_size``: the builder's, or the registry's).
    """
    return build_model(lookup(name), num_classes, in_channels, weights, **kwargs)
