"""VGG (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale Image
Recognition"): stacks of 3x3 convolutions between 2x2 max-pools, then three linear layers.

Same layout as torchvision's vgg.py (a flat ``features`` Sequential, ``avgpool``,
``classifier``), so its state_dicts and weight files load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.models.blocks import ConvBNAct, NormLayer, check_rate
from cnnlab.registry import register_model

# Number of 3x3 convs in each of the five stages (the paper's configurations A, B, D, E),
# by depth; every stage ends in a 2x2 max-pool.
_STAGE_WIDTHS = (64, 128, 256, 512, 512)
# What the registry records about every VGG (see cnnlab.registry.ModelInfo).
_FACTS = {
    "head": ("avgpool", "classifier"),
    "pool": "flatten",
    "classifier": ("classifier",),
    "first_conv": "features.0",
    "explain_layer": "features",
}
_STAGE_DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _make_features(
    stage_depths: tuple[int, ...], in_channels: int, norm_layer: NormLayer | None
) -> tuple[nn.Sequential, list[dict[str, Any]]]:
    # One flat Sequential, as in torchvision, so the keys stay features.0, features.1, ...;
    # feature_info names each max-pool's output (reductions 2, 4, 8, 16, 32).
    layers: list[nn.Module] = []
    feature_info: list[dict[str, Any]] = []
    for stage, (depth, width) in enumerate(zip(stage_depths, _STAGE_WIDTHS, strict=True)):
        for _ in range(depth):
            if norm_layer is None:
                layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            else:
                # The convs keep their bias before the BN, as in torchvision.
                layers += ConvBNAct(in_channels, width, 3, bias=True, norm_layer=norm_layer)
            in_channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        module = f"features.{len(layers) - 1}"
        feature_info.append({"num_chs": width, "reduction": 2 ** (stage + 1), "module": module})
    return nn.Sequential(*layers), feature_info


class VGG(nn.Module):
    def __init__(
        self,
        stage_depths: tuple[int, ...],  # 3x3 convs per stage
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: NormLayer | None = None,  # None: no normalisation, as in the paper
        dropout: float = 0.5,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        dropout = check_rate("vgg", "dropout", dropout)
        self.features, self.feature_info = _make_features(stage_depths, in_channels, norm_layer)
        channels = self.feature_info[-1]["num_chs"]
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:  # torchvision's init
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 512, H/32, W/32)

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.avgpool(x)  # (B, 512, 7, 7) whatever the input size
        x = torch.flatten(x, 1)  # (B, 25088)
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _vgg(
    depth: int,
    norm_layer: NormLayer | None,
    num_classes: int,
    in_channels: int,
    **kwargs: Any,
) -> VGG:
    return VGG(_STAGE_DEPTHS[depth], num_classes, in_channels, norm_layer, **kwargs)


@register_model(min_size=32, torchvision="vgg11", **_FACTS)
def vgg11(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-11 (configuration A): 8 convs and 3 linear layers, 132.9M parameters."""
    return _vgg(11, None, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg13", **_FACTS)
def vgg13(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-13 (configuration B): 10 convs and 3 linear layers, 133.0M parameters."""
    return _vgg(13, None, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg16", **_FACTS)
def vgg16(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-16 (configuration D): 13 convs and 3 linear layers, 138.4M parameters."""
    return _vgg(16, None, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg19", **_FACTS)
def vgg19(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-19 (configuration E): 16 convs and 3 linear layers, 143.7M parameters."""
    return _vgg(19, None, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg11_bn", **_FACTS)
def vgg11_bn(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-11 with batch normalisation after every conv."""
    return _vgg(11, nn.BatchNorm2d, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg13_bn", **_FACTS)
def vgg13_bn(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-13 with batch normalisation after every conv."""
    return _vgg(13, nn.BatchNorm2d, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg16_bn", **_FACTS)
def vgg16_bn(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-16 with batch normalisation after every conv."""
    return _vgg(16, nn.BatchNorm2d, num_classes, in_channels, **kwargs)


@register_model(min_size=32, torchvision="vgg19_bn", **_FACTS)
def vgg19_bn(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> VGG:
    """VGG-19 with batch normalisation after every conv."""
    return _vgg(19, nn.BatchNorm2d, num_classes, in_channels, **kwargs)
