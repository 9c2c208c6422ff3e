"""``build_model``: the one function that builds a registered model from its ``ModelInfo``
(timm's ``_builder``): calls the builder with the settings given, records the model's name
and minimum input size, and loads weights. Model files that build other models (a head's
backbone) call it; by name, the zoo is ``cnnlab.models.factory``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.registry import ModelInfo
from cnnlab.weights import load_pretrained


def build_model(
    info: ModelInfo,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build the model ``info`` registers, optionally loading weights (a file or
    ``"torchvision"``); the arguments are ``create_model``'s."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = info.builder(**kwargs)
    except TypeError as error:  # an argument the builder (or its model) does not take
        raise CnnlabError(f"{info.name}: {error}") from None
    model.model_name = info.name
    model.min_input_size = getattr(model, "min_input_size", info.min_size)
    if weights is not None:
        load_pretrained(model, info, weights)
    return model
