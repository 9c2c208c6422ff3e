"""AlexNet (Krizhevsky et al. 2012), as torchvision builds it: the one-GPU variant of
"One weird trick..." (Krizhevsky 2014), with 64/192/384/256/256 filters and no local response
normalisation. Same layout as torchvision's alexnet.py, so its weights load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.models.blocks import check_rate
from cnnlab.registry import register_model


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        dropout = check_rate("alexnet", "dropout", dropout)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        # Each max-pool's output. The pools have no padding, so the sizes fall a little short
        # of H/reduction (224 -> 27, 13, 6); they match exactly for H = 32k - 1 (63, 127, ...).
        self.feature_info = [
            {"num_chs": 64, "reduction": 8, "module": "features.2"},
            {"num_chs": 192, "reduction": 16, "module": "features.5"},
            {"num_chs": 256, "reduction": 32, "module": "features.12"},
        ]
        # No init loop: torchvision keeps PyTorch's default init for AlexNet.

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 256, ~H/32, ~W/32)

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.avgpool(x)  # (B, 256, 6, 6)
        x = torch.flatten(x, 1)  # (B, 9216)
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(
    min_size=63,
    torchvision="alexnet",
    head=("avgpool", "classifier"),
    pool="flatten",
    classifier=("classifier",),
    first_conv="features.0",
)
def alexnet(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> AlexNet:
    """AlexNet: 5 convs and 3 linear layers, 61.1M parameters at 1000 classes."""
    return AlexNet(num_classes, in_channels, **kwargs)
