"""ResNet (He et al. 2015, "Deep Residual Learning for Image Recognition").

Same layout as torchvision's resnet.py (conv1/bn1/relu/maxpool, layer1..layer4 of
BasicBlock or Bottleneck, fc), so its state_dicts and weight files load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.models.blocks import BasicBlock, Bottleneck, NormLayer
from cnnlab.registry import register_model

Block = type[BasicBlock] | type[Bottleneck]
# What the registry records about every ResNet (see cnnlab.registry.ModelInfo).
_FACTS = {
    "head": ("avgpool", "fc"),
    "pool": "avg",
    "classifier": ("fc",),
    "first_conv": "conv1",
    "explain_layer": "layer4",
}


def _make_layer(
    block: Block, in_channels: int, planes: int, depth: int, stride: int, norm_layer: NormLayer
) -> nn.Sequential:
    # The first block changes stride and width (through its projection shortcut).
    out_channels = planes * block.expansion
    rest = [block(out_channels, planes, norm_layer=norm_layer) for _ in range(depth - 1)]
    return nn.Sequential(block(in_channels, planes, stride, norm_layer), *rest)


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],  # blocks per stage
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        e = block.expansion
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer(block, 64, 64, layers[0], 1, norm_layer)
        self.layer2 = _make_layer(block, 64 * e, 128, layers[1], 2, norm_layer)
        self.layer3 = _make_layer(block, 128 * e, 256, layers[2], 2, norm_layer)
        self.layer4 = _make_layer(block, 256 * e, 512, layers[3], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * e, num_classes)
        # timm's convention: the stem's activation, then the output of each stage.
        self.feature_info = [
            {"num_chs": 64, "reduction": 2, "module": "relu"},
            {"num_chs": 64 * e, "reduction": 4, "module": "layer1"},
            {"num_chs": 128 * e, "reduction": 8, "module": "layer2"},
            {"num_chs": 256 * e, "reduction": 16, "module": "layer3"},
            {"num_chs": 512 * e, "reduction": 32, "module": "layer4"},
        ]

        # torchvision's init; the fc keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init of the last BN's gamma in each residual branch makes every block start as
        # the identity; Goyal et al. 2017 ("Accurate, Large Minibatch SGD", arXiv:1706.02677)
        # report +0.2-0.3% top-1. Opt-in, as in torchvision.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    m.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, 64, H/2, W/2)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 64e, H/4, W/4)
        x = self.layer2(x)  # (B, 128e, H/8, W/8)
        x = self.layer3(x)  # (B, 256e, H/16, W/16)
        return self.layer4(x)  # (B, 512e, H/32, W/32)

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.avgpool(x)  # (B, 512e, 1, 1)
        x = torch.flatten(x, 1)
        return self.fc(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(min_size=1, torchvision="resnet18", **_FACTS)
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-18: BasicBlock stages of 2, 2, 2, 2 (11.7M parameters at 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, **kwargs)


@register_model(min_size=1, torchvision="resnet34", **_FACTS)
def resnet34(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-34: BasicBlock stages of 3, 4, 6, 3 (21.8M parameters)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, **kwargs)


@register_model(min_size=1, torchvision="resnet50", **_FACTS)
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-50: Bottleneck stages of 3, 4, 6, 3 (25.6M parameters)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, **kwargs)


@register_model(min_size=1, torchvision="resnet101", **_FACTS)
def resnet101(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-101: Bottleneck stages of 3, 4, 23, 3 (44.5M parameters)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, in_channels, **kwargs)


@register_model(min_size=1, torchvision="resnet152", **_FACTS)
def resnet152(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-152: Bottleneck stages of 3, 8, 36, 3 (60.2M parameters)."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, in_channels, **kwargs)
