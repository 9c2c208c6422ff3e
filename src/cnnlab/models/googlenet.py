"""GoogLeNet, Inception v1 (Szegedy et al. 2014, "Going Deeper with Convolutions").

Same layout as torchvision's googlenet.py (its BasicConv2d is cnnlab's ConvBNAct with
eps=0.001), so its state_dicts and weight files load unchanged.
"""

from __future__ import annotations

from collections import namedtuple
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.models.blocks import ConvBNAct, Inception, check_rate
from cnnlab.registry import register_model

# What a training-mode forward returns with aux_logits=True; the same fields as torchvision's.
GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])

_conv_block = partial(ConvBNAct, eps=0.001)


class InceptionAux(nn.Module):
    # An auxiliary classifier on an intermediate map, used only in training to help the
    # gradient reach the early layers (its loss is added with weight 0.3 in the paper).
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.conv = _conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x, (4, 4))  # (B, in, 4, 4)
        x = self.conv(x)  # (B, 128, 4, 4)
        x = torch.flatten(x, 1)  # (B, 2048)
        x = F.relu(self.fc1(x), inplace=True)  # (B, 1024)
        x = self.dropout(x)
        return self.fc2(x)  # (B, num_classes)


class GoogLeNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        aux_logits: bool = False,
        transform_input: bool = False,
        init_weights: bool = True,
        dropout: float = 0.2,
        dropout_aux: float = 0.7,
    ) -> None:
        super().__init__()
        dropout = check_rate("googlenet", "dropout", dropout)
        dropout_aux = check_rate("googlenet", "dropout_aux", dropout_aux)
        if transform_input and in_channels != 3:
            raise CnnlabError(
                f"googlenet: transform_input re-normalises RGB inputs; in_channels={in_channels}"
            )
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = _conv_block(in_channels, 64, kernel_size=7, stride=2)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _conv_block(64, 64, kernel_size=1)
        self.conv3 = _conv_block(64, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32, _conv_block)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64, _conv_block)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64, _conv_block)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64, _conv_block)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64, _conv_block)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64, _conv_block)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128, _conv_block)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128, _conv_block)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128, _conv_block)

        self.aux1 = InceptionAux(512, num_classes, dropout_aux) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes, dropout_aux) if aux_logits else None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        # The last module at each stride.
        self.feature_info = [
            {"num_chs": 64, "reduction": 2, "module": "conv1"},
            {"num_chs": 192, "reduction": 4, "module": "conv3"},
            {"num_chs": 480, "reduction": 8, "module": "inception3b"},
            {"num_chs": 832, "reduction": 16, "module": "inception4e"},
            {"num_chs": 1024, "reduction": 32, "module": "inception5b"},
        ]

        if init_weights:  # torchvision's init
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _transform_input(self, x: Tensor) -> Tensor:
        # The ported weights expect inputs scaled to [-1, 1]; this maps ImageNet-normalised
        # inputs there.
        if not self.transform_input:
            return x
        x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x_ch0, x_ch1, x_ch2), 1)

    def _trunk(self, x: Tensor, with_aux: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # Returns the last feature map and, when with_aux, the two auxiliary logits.
        x = self._transform_input(x)
        x = self.conv1(x)  # (B, 64, H/2, W/2)
        x = self.maxpool1(x)  # (B, 64, H/4, W/4)
        x = self.conv2(x)
        x = self.conv3(x)  # (B, 192, H/4, W/4)
        x = self.maxpool2(x)  # (B, 192, H/8, W/8)
        x = self.inception3a(x)  # (B, 256, H/8, W/8)
        x = self.inception3b(x)  # (B, 480, H/8, W/8)
        x = self.maxpool3(x)  # (B, 480, H/16, W/16)
        x = self.inception4a(x)  # (B, 512, H/16, W/16)
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)  # (B, 528, H/16, W/16)
        aux2 = self.aux2(x) if with_aux else None
        x = self.inception4e(x)  # (B, 832, H/16, W/16)
        x = self.maxpool4(x)  # (B, 832, H/32, W/32)
        x = self.inception5a(x)
        x = self.inception5b(x)  # (B, 1024, H/32, W/32)
        return x, aux1, aux2

    def forward_features(self, x: Tensor) -> Tensor:
        return self._trunk(x, with_aux=False)[0]

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.avgpool(x)  # (B, 1024, 1, 1)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutputs:
        # Like torchvision: the auxiliary classifiers run in training mode only, and then the
        # forward returns all three logits.
        with_aux = self.training and self.aux_logits
        x, aux1, aux2 = self._trunk(x, with_aux)
        logits = self.forward_head(x)
        return GoogLeNetOutputs(logits, aux2, aux1) if with_aux else logits


@register_model(
    min_size=15,
    torchvision="googlenet",
    head=("avgpool", "dropout", "fc"),
    pool="avg",
    classifier=("fc", "aux1", "aux2"),
    first_conv="conv1.conv",
    explain_layer="inception5b",
)
def googlenet(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet: nine Inception modules, 6.6M parameters at 1000 classes.

    ``aux_logits=True`` adds the two auxiliary classifiers; a training-mode forward then
    returns ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``. ``transform_input=True``
    re-normalises ImageNet-normalised inputs for torchvision's pretrained weights, which were
    made with it on.
    """
    return GoogLeNet(num_classes, in_channels, **kwargs)
