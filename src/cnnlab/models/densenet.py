"""DenseNet-BC (Huang et al. 2016, "Densely Connected Convolutional Networks").

Same layout as torchvision's densenet.py (``features`` holding conv0/norm0/relu0/pool0,
denseblock1..4, transition1..3 and norm5; ``classifier``), so its state_dicts load
unchanged. torchvision applies the final ReLU functionally; here it is ``features.relu5``
(no parameters, so the state_dict is the same), which makes the last feature map
addressable by name.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.models.blocks import DenseBlock, NormLayer, Transition, check_rate
from cnnlab.registry import register_model

# What the registry records about every DenseNet (see cnnlab.registry.ModelInfo); the
# global pool is functional, as in torchvision.
_FACTS = {
    "head": ("classifier",),
    "pool": "avg",
    "classifier": ("classifier",),
    "first_conv": "features.conv0",
    "explain_layer": "features",
}


class DenseNet(nn.Module):
    def __init__(
        self,
        growth_rate: int = 32,  # k in the paper: channels each dense layer adds
        block_config: tuple[int, ...] = (6, 12, 24, 16),  # dense layers per block
        num_init_features: int = 64,  # channels of the stem conv
        bn_size: int = 4,  # bottleneck width, in multiples of growth_rate
        drop_rate: float = 0.0,  # dropout after each dense layer
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        drop_rate = check_rate("densenet", "drop_rate", drop_rate)
        norm_layer = norm_layer or nn.BatchNorm2d
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False),
                norm0=norm_layer(num_init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        channels = num_init_features
        stages = [("features.relu0", channels)]  # (module, channels), one per stride
        for i, num_layers in enumerate(block_config, start=1):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate, norm_layer)
            self.features.add_module(f"denseblock{i}", block)
            channels = block.out_channels
            if i < len(block_config):
                stages.append((f"features.denseblock{i}", channels))
                # Compression 0.5: each transition halves the channels and the resolution.
                transition = Transition(channels, channels // 2, norm_layer)
                self.features.add_module(f"transition{i}", transition)
                channels //= 2
        self.features.add_module("norm5", norm_layer(channels))
        self.features.add_module("relu5", nn.ReLU(inplace=True))
        stages.append(("features.relu5", channels))
        # The last module at each stride: the stem's activation, blocks 1-3, the final ReLU.
        self.feature_info = [
            {"num_chs": num_chs, "reduction": 2 ** (i + 1), "module": module}
            for i, (module, num_chs) in enumerate(stages)
        ]
        self.classifier = nn.Linear(channels, num_classes)

        # torchvision's init (the classifier's weight keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, C, H/32, W/32); C = 1024 for densenet121

    def forward_head(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x, (1, 1))  # (B, C, 1, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(min_size=29, torchvision="densenet121", **_FACTS)
def densenet121(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> DenseNet:
    """DenseNet-121: growth rate 32, blocks of 6, 12, 24, 16 layers (8.0M parameters)."""
    return DenseNet(
        32, (6, 12, 24, 16), 64, num_classes=num_classes, in_channels=in_channels, **kwargs
    )


@register_model(min_size=29, torchvision="densenet161", **_FACTS)
def densenet161(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> DenseNet:
    """DenseNet-161: growth rate 48, blocks of 6, 12, 36, 24 layers (28.7M parameters)."""
    return DenseNet(
        48, (6, 12, 36, 24), 96, num_classes=num_classes, in_channels=in_channels, **kwargs
    )


@register_model(min_size=29, torchvision="densenet169", **_FACTS)
def densenet169(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> DenseNet:
    """DenseNet-169: growth rate 32, blocks of 6, 12, 32, 32 layers (14.1M parameters)."""
    return DenseNet(
        32, (6, 12, 32, 32), 64, num_classes=num_classes, in_channels=in_channels, **kwargs
    )


@register_model(min_size=29, torchvision="densenet201", **_FACTS)
def densenet201(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> DenseNet:
    """DenseNet-201: growth rate 32, blocks of 6, 12, 48, 32 layers (20.0M parameters)."""
    return DenseNet(
        32, (6, 12, 48, 32), 64, num_classes=num_classes, in_channels=in_channels, **kwargs
    )
