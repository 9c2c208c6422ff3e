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

Which modules form the head, in which order, and how it pools are registry data
(``ModelInfo.head`` and ``ModelInfo.pool``), so any registered classifier that declares
them converts. In both cases ``copy(x).mean((-2, -1))`` equals ``model(x)`` at the training
size, and the copy has exactly the original's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.registry import check_input_size, info_of

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
        # The classifier's fixed input size (convnet) no longer applies; a minimum does.
        self.min_input_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(self, *x.shape[-2:])
        return self.head(self.body.forward_features(x))  # (B, K, H', W')


def convolutionalize(model: nn.Module) -> FullyConvolutional:
    """A fully convolutional copy of a zoo classifier (the original is left unchanged)."""
    info = info_of(model)
    name = getattr(model, "model_name", type(model).__name__)
    if info is None or info.task != "classify" or not info.head:
        raise CnnlabError(
            f"cannot convolutionalize {name}: only registered classifiers whose registry"
            " entry names their head can be (see cnnlab.registry.ModelInfo.head)"
        )
    body = copy.deepcopy(model)
    modules = [body.get_submodule(part) for part in info.head]
    pools = [m for m in modules if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d)]
    kernel = (1, 1)  # a global-pooling head scores every feature cell
    if info.pool == "flatten":
        # The first Linear covers the map it flattened: the adaptive pool's size, or the
        # features' at the size the model is built for (the ConvNet).
        kernel = _pair(pools[0].output_size) if pools else _meta_probe(body)(*body.fixed_input_size)
    # The pools go: the identity at the training size (flatten) or the mean over the score
    # map taken outside (global).
    layers = [layer for m in modules if m not in pools for layer in _layers(m)]
    head = _convolutional_head(layers, kernel)
    for part in info.head:
        parent, _, child = part.rpartition(".")
        delattr(body.get_submodule(parent), child)
    min_size, window = getattr(model, "min_input_size", 1), None
    if info.pool == "flatten":
        min_size = window = _smallest_input(_meta_probe(body), kernel, min_size)
    return FullyConvolutional(body, head, name, min_size, window)


def _layers(module: nn.Module) -> list[nn.Module]:
    return list(module) if isinstance(module, nn.Sequential) else [module]


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


def _convolutional_head(head: list[nn.Module], kernel: tuple[int, int]) -> nn.Sequential:
    """Flatten dropped, first Linear over ``kernel``, later Linears 1x1, BatchNorm1d -> 2d."""
    layers: list[nn.Module] = []
    for layer in head:
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
