"""FCN (Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic
Segmentation"): any zoo backbone's stride-32 features scored by a 1x1 convolution and
upsampled back to the input, with skips from the stride-16 (FCN-16s) and stride-8 (FCN-8s)
stages refining the coarse map.

The backbone is a zoo classifier cut after the modules its ``feature_info`` names at
strides 32, 16 and 8 (``cnnlab.models.features``), its classifier head removed. Each
skip fuses by summing a 2x-upsampled score map with a 1x1 score of the finer stage; the
final upsampling returns exactly the input's H x W, for any size (maps are cropped or
edge-padded to fit after each upsampling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.models.features import backbone as backbone_features
from cnnlab.registry import register_model

_STRIDES = (32, 16, 8)  # score map strides, coarse to fine


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """ConvTranspose2d weights (channels, channels, k, k) that interpolate each channel
    bilinearly (the FCN paper's initialisation; with stride k/2 and padding k/4 they equal
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` away from the border)."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - centre).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
    return weight


def bilinear_upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A transposed convolution that upsamples (B, C, h, w) to (B, C, h*factor, w*factor),
    initialised to bilinear interpolation."""
    layer = nn.ConvTranspose2d(
        channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False
    )
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


def fit(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop (B, C, h, w) at the bottom/right, or pad it by repeating the edge, to ``size``."""
    height, width = size
    # Pad (by zero rows where it is big enough), then crop: no branch on the sizes, which
    # torch.export would otherwise fix to the example input's side of it.
    pad_h, pad_w = torch.sym_max(height - x.shape[-2], 0), torch.sym_max(width - x.shape[-1], 0)
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")[..., :height, :width]


def _zero_score(in_channels: int, num_classes: int) -> nn.Conv2d:
    # The paper zero-initialises the skip scores, so a new skip starts by changing nothing.
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FCN(nn.Module):
    """FCN-32s, -16s or -8s (``skips`` = 0, 1 or 2) over a zoo backbone's feature maps."""

    def __init__(self, backbone: nn.Module, taps: list[dict], num_classes: int) -> None:
        super().__init__()
        # backbone: (B, C, H, W) -> {"0": stride-32 map, "1": stride 16, "2": stride 8}
        self.backbone = backbone
        skips = len(taps) - 1
        self.score32 = nn.Conv2d(taps[0]["num_chs"], num_classes, 1)
        if skips >= 1:
            self.up32 = bilinear_upsampling(num_classes, 2)
            self.score16 = _zero_score(taps[1]["num_chs"], num_classes)
        if skips >= 2:
            self.up16 = bilinear_upsampling(num_classes, 2)
            self.score8 = _zero_score(taps[2]["num_chs"], num_classes)
        # The paper learns the 2x upsamplings but fixes the final one to bilinear.
        final = _STRIDES[skips]
        self.upsample = bilinear_upsampling(num_classes, final).requires_grad_(False)
        self.feature_info = [
            {**tap, "module": f"backbone.{tap['module']}"} for tap in reversed(taps)
        ]

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        score = self.score32(features["0"])  # (B, K, H/32, W/32)
        if hasattr(self, "score16"):
            skip = self.score16(features["1"])  # (B, K, H/16, W/16)
            score = fit(self.up32(score), skip.shape[-2:]) + skip
        if hasattr(self, "score8"):
            skip = self.score8(features["2"])  # (B, K, H/8, W/8)
            score = fit(self.up16(score), skip.shape[-2:]) + skip
        return fit(self.upsample(score), x.shape[-2:])  # (B, K, H, W)


def _fcn(
    skips: int,
    num_classes: int,
    in_channels: int,
    backbone: str,
    backbone_weights: str | Path | None,
    backbone_args: dict[str, Any] | None,
) -> FCN:
    # The backbone is built whole (so classifier weight files load), then cut after its
    # stride-8 stage; the classifier head goes.
    features, taps = backbone_features(
        backbone, _STRIDES[: skips + 1], in_channels, backbone_weights, backbone_args
    )
    model = FCN(features, taps, num_classes)
    model.min_input_size = max(32, features.min_input_size)  # AlexNet needs more than 32
    return model


@register_model(min_size=32, task="segment", explain_layer="score32")
def fcn32s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone: str = "vgg16",
    backbone_weights: str | Path | None = None,
    backbone_args: dict[str, Any] | None = None,
) -> FCN:
    """FCN-32s: stride-32 scores upsampled 32x in one step."""
    return _fcn(0, num_classes, in_channels, backbone, backbone_weights, backbone_args)


@register_model(min_size=32, task="segment", explain_layer="score32")
def fcn16s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone: str = "vgg16",
    backbone_weights: str | Path | None = None,
    backbone_args: dict[str, Any] | None = None,
) -> FCN:
    """FCN-16s: FCN-32s plus a skip from the stride-16 stage, upsampled 16x."""
    return _fcn(1, num_classes, in_channels, backbone, backbone_weights, backbone_args)


@register_model(min_size=32, task="segment", explain_layer="score32")
def fcn8s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone: str = "vgg16",
    backbone_weights: str | Path | None = None,
    backbone_args: dict[str, Any] | None = None,
) -> FCN:
    """FCN-8s: FCN-16s plus a skip from the stride-8 stage, upsampled 8x."""
    return _fcn(2, num_classes, in_channels, backbone, backbone_weights, backbone_args)
