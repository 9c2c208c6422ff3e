"""Small networks for the worked examples of docs/notes.md, inspected with
``cnnlab summary docs/examples.py:NAME`` and ``cnnlab compare``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import cnnlab
from cnnlab.models.blocks import Inception


def two_3x3(channels: int = 64) -> nn.Module:
    """Two stacked 3x3 convolutions (VGG's choice)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
    )


def one_5x5(channels: int = 64) -> nn.Module:
    """One 5x5 convolution: the field of the two 3x3s above, at a higher price."""
    return nn.Conv2d(channels, channels, 5, padding=2, bias=False)


def bottleneck(channels: int = 256, width: int = 64) -> nn.Module:
    """ResNet's bottleneck: 1x1 down to ``width``, 3x3 there, 1x1 back up."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(width, channels, 1, bias=False),
    )


def plain_3x3(channels: int = 256) -> nn.Module:
    """One 3x3 convolution on all the channels."""
    return nn.Conv2d(channels, channels, 3, padding=1, bias=False)


class NaiveInception(nn.Module):
    """GoogLeNet's inception 3a without its 1x1 reductions: the 3x3 and 5x5 convolutions
    see all 192 channels, and the pooled branch passes its 192 channels on."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(192, 64, 1)
        self.branch2 = nn.Conv2d(192, 128, 3, padding=1)
        self.branch3 = nn.Conv2d(192, 32, 5, padding=2)
        self.branch4 = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


def inception(reduce: bool = True) -> nn.Module:
    """Inception 3a (192 -> 256 channels at 28x28) as GoogLeNet has it, or naive."""
    return Inception(192, 64, 96, 128, 16, 32, 32) if reduce else NaiveInception()


def fully_convolutional_alexnet() -> nn.Module:
    """AlexNet with its dense layers turned into convolutions (cnnlab.convolutionalize)."""
    return cnnlab.convolutionalize(cnnlab.create_model("alexnet"))
