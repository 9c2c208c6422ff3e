"""Turn a trained classifier into a fully convolutional network that scores every window.

Long, Shelhamer & Darrell (2015) observed that a classifier's fully connected layers are
convolutions whose kernels cover the whole input map: run over a larger image, the same
weights give a grid of class scores, one per window, in a single pass. Here:

- flatten heads (convnet, AlexNet, VGG): the first Linear becomes a Conv2d with the kernel of
  the map it used to flatten, later Linears become 1x1 convolutions. AlexNet's and VGG's
  adaptive average pooling is dropped; it is the identity where the features already have
  the pooled size (224x224 inputs for both), which is where the logits match exactly;
- global-pooling heads (ResNet, DenseNet, GoogLeNet): the Linear becomes a 1x1 convolution
  applied *before* pooling, so each cell gets its own scores (a class activation map); their
  spatial mean is the original's logits at any input size.

In both cases ``copy(x).mean((-2, -1))`` equals ``model(x)`` at the training size, and the
copy has exactly the original's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.registry import _check_input_size

SUPPORTED = ("convnet", "alexnet", "vgg", "resnet", "densenet", "googlenet")

# Layers that act on each element (or each channel) alike, so a 4-D input is fine.
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
)


class FullyConvolutional(nn.Module):
    """A classifier's ``forward_features`` followed by its head as convolutions; returns
    per-window logits (B, num_classes, H', W')."""

    def __init__(
        self, body: nn.Module, head: nn.Sequential, name: str, min_size: int, window: int | None
    ) -> None:
        super().__init__()
        self.body = body  # the classifier without its head (only forward_features is called)
        self.head = head
        # Flatten heads: each map cell scores one window x window input crop (the training
        # size). Pooled heads (None): each cell is one feature-map cell, and they tile the input.
        self.window = window
        self.model_name = f"{name} (fully convolutional)"
        self.min_input_size = min_size
        # The classifier's fixed input size (convnet) no longer applies; its minimum does.
        self.register_forward_pre_hook(_check_input_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body.forward_features(x))  # (B, K, H', W')


def family_of(model: nn.Module) -> str | None:
    """The zoo file a model class comes from ("resnet", "vgg", ...), or None."""
    module = type(model).__module__
    prefix = "cnnlab.models."
    return module[len(prefix) :] if module.startswith(prefix) else None


def convolutionalize(model: nn.Module) -> FullyConvolutional:
    """A fully convolutional copy of a zoo classifier (the original is left unchanged)."""
    family = family_of(model)
    name = getattr(model, "model_name", type(model).__name__)
    if family not in SUPPORTED:
        raise CnnlabError(
            f"cannot convolutionalize {name}: supported families are {', '.join(SUPPORTED)}"
        )
    body = copy.deepcopy(model)
    body._forward_pre_hooks.clear()  # the copy's own hook checks sizes instead
    if family in ("alexnet", "vgg"):
        kernel = _pair(body.avgpool.output_size)
        head = _convolutional_head(body.classifier, kernel)
        del body.avgpool, body.classifier
    elif family == "convnet":
        kernel = _meta_probe(body)(*body.fixed_input_size)
        head = _convolutional_head(body.classifier, kernel)
        del body.classifier
        body.fixed_input_size = None
    elif family == "resnet":
        head = nn.Sequential(_pointwise(body.fc))
        del body.fc
    elif family == "googlenet":
        head = nn.Sequential(body.dropout, _pointwise(body.fc))
        del body.fc, body.dropout
    else:  # densenet: its features end in a ReLU, its head is global pool -> classifier
        head = nn.Sequential(_pointwise(body.classifier))
        del body.classifier
    min_size, window = getattr(model, "min_input_size", 1), None
    if family in ("alexnet", "vgg", "convnet"):
        min_size = window = _smallest_input(_meta_probe(body), kernel, min_size)
    return FullyConvolutional(body, head, name, min_size, window)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _pointwise(linear: nn.Linear, kernel: tuple[int, int] = (1, 1)) -> nn.Conv2d:
    """The Linear as a Conv2d over a (C, kh, kw) window, C = in_features / (kh * kw)."""
    kh, kw = kernel
    channels = linear.in_features // (kh * kw)
    conv = nn.Conv2d(channels, linear.out_features, kernel, bias=linear.bias is not None)
    conv = conv.to(linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        # torch.flatten of (C, kh, kw) is channel-major, so a plain reshape lines up.
        conv.weight.copy_(linear.weight.reshape(linear.out_features, channels, kh, kw))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def _as_2d(layer: nn.BatchNorm1d) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine)
    norm.load_state_dict(layer.state_dict())
    return norm.to(layer.weight.device if layer.affine else layer.running_mean.device)


def _convolutional_head(classifier: nn.Sequential, kernel: tuple[int, int]) -> nn.Sequential:
    """Flatten dropped, first Linear over ``kernel``, later Linears 1x1, BatchNorm1d -> 2d."""
    layers: list[nn.Module] = []
    for layer in classifier:
        if isinstance(layer, nn.Flatten):
            continue
        if isinstance(layer, nn.Linear):
            layers.append(_pointwise(layer, kernel))
            kernel = (1, 1)
        elif isinstance(layer, nn.BatchNorm1d):
            layers.append(_as_2d(layer))
        elif isinstance(layer, _ELEMENTWISE):
            layers.append(layer)
        else:
            raise CnnlabError(f"cannot convolutionalize a {type(layer).__name__} in the head")
    return nn.Sequential(*layers)


def _meta_probe(body: nn.Module) -> Callable[[int, int], tuple[int, int] | None]:
    """(H, W) -> (h, w) of ``body.forward_features``, computed on the meta device (no
    arithmetic); None when the input is too small for the features."""
    shadow = copy.deepcopy(body).to("meta")
    channels = next(m for m in shadow.modules() if isinstance(m, nn.Conv2d)).in_channels

    def probe(height: int, width: int) -> tuple[int, int] | None:
        x = torch.empty(1, channels, height, width, device="meta")
        try:
            return tuple(shadow.forward_features(x).shape[-2:])
        except RuntimeError:
            return None

    return probe


def _smallest_input(probe: Callable, kernel: tuple[int, int], lowest: int) -> int:
    """The smallest square input whose feature map covers the first convolution's kernel."""

    def fits(size: int) -> bool:
        out = probe(size, size)
        return out is not None and out[0] >= kernel[0] and out[1] >= kernel[1]

    low = high = max(lowest, 1)
    while not fits(high):
        low, high = high + 1, high * 2
    while low < high:  # the feature map grows with the input: bisect
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return low
