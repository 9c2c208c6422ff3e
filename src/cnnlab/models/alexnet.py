"""AlexNet (Krizhevsky et al. 2012), twice.

``alexnet`` is torchvision's: the one-GPU variant of "One weird trick..." (Krizhevsky
2014), with 64/192/384/256/256 filters and no local response normalisation, in
torchvision's layout so that its weights load unchanged. ``alexnet_paper`` is the
network of the 2012 paper, split over two GPUs (grouped convolutions) with local response
normalisation: the one whose figure shows two streams.
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
    explain_layer="features",
)
def alexnet(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> AlexNet:
    """AlexNet: 5 convs and 3 linear layers, 61.1M parameters at 1000 classes."""
    return AlexNet(num_classes, in_channels, **kwargs)


class AlexNetPaper(nn.Module):
    # The network of Krizhevsky, Sutskever & Hinton (2012) as the paper built it across two
    # GPUs: 96-256-384-384-256 filters, where conv2, conv4 and conv5 see only the half of
    # the channels on their own GPU (groups=2) and conv3 and the dense layers see both;
    # local response normalisation (k=2, n=5, alpha=1e-4, beta=0.75) after the first two
    # ReLUs; overlapping 3x3 pooling with stride 2; 227x227 inputs (the paper's "224"
    # does not divide: (224 - 11)/4 + 1 is not whole). 60,965,224 parameters at 1000
    # classes, the figure of the Caffe model zoo's bvlc_alexnet.
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        dropout = check_rate("alexnet_paper", "dropout", dropout)

        def lrn() -> nn.Module:
            return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4),  # 227 -> 55
            nn.ReLU(inplace=True),
            lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 55 -> 27
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 27 -> 13
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # both GPUs' maps
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 13 -> 6
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        self.fixed_input_size = (227, 227)  # fc6 takes exactly 6x6x256
        self.feature_info = [
            {"num_chs": 96, "reduction": 8, "module": "features.3"},
            {"num_chs": 256, "reduction": 16, "module": "features.7"},
            {"num_chs": 256, "reduction": 32, "module": "features.14"},
        ]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, 256, 6, 6) at 227x227

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(
    min_size=227,
    input_size=(3, 227, 227),
    head=("classifier",),
    pool="flatten",
    classifier=("classifier",),
    first_conv="features.0",
    explain_layer="features",
)
def alexnet_paper(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> AlexNetPaper:
    """AlexNet as the 2012 paper built it on two GPUs (grouped convs, LRN), 61.0M
    parameters at 1000 classes; 227x227 inputs."""
    return AlexNetPaper(num_classes, in_channels, **kwargs)
