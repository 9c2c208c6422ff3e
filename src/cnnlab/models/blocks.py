"""Building blocks shared by the model families.

Attribute names follow torchvision (googlenet.py's ``BasicConv2d`` and ``Inception``,
resnet.py's blocks, densenet.py's ``_DenseLayer``/``_DenseBlock``/``_Transition``), so the
state_dicts of cnnlab's models and torchvision's have the same keys and weight files load
unchanged. Where a block has a normalisation layer it is passed in as ``norm_layer``
(``None`` means ``nn.BatchNorm2d``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.errors import CnnlabError

NormLayer = Callable[..., nn.Module]


def check_rate(model: str, name: str, value: object) -> float:
    """A dropout rate in [0, 1), or a CnnlabError naming the model's argument."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise CnnlabError(f"{model}: {name} must be a rate in [0, 1), got {value!r}")
    return float(value)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ConvBNAct(nn.Sequential):
    # Conv -> norm -> activation, named conv/bn/act: the keys of torchvision's BasicConv2d
    # (which uses eps=0.001). Models whose state_dict is a flat Sequential (VGG-BN, ConvNet)
    # unpack it into their own list: `layers += ConvBNAct(...)`.
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,  # None: kernel_size // 2, "same" size for odd kernels
        *,
        bias: bool = False,
        eps: float = 1e-5,
        norm_layer: NormLayer | None = None,
        act_layer: Callable[[], nn.Module] | None = None,  # None: nn.ReLU(inplace=True)
    ) -> None:
        norm_layer = norm_layer or nn.BatchNorm2d
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias),
                bn=norm_layer(out_channels, eps=eps),
                act=act_layer() if act_layer else nn.ReLU(inplace=True),
            )
        )


class Inception(nn.Module):
    # GoogLeNet's module (Szegedy et al. 2014): four parallel branches concatenated on the
    # channels; 1x1 convolutions reduce the channels before the larger kernels and after the
    # pooling, which is what keeps the network at 6.6M parameters.
    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block: Callable[..., nn.Module] | None = None,  # None: ConvBNAct
    ) -> None:
        super().__init__()
        conv_block = conv_block or ConvBNAct
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3),
        )
        # The "5x5" branch has a 3x3 kernel in torchvision (pytorch/vision#906), whose
        # weights were trained that way; kept so they load.
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=3),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        # (B, in, H, W) -> (B, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W)
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


def _projection(
    in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer
) -> nn.Sequential | None:
    # The projection shortcut (option B of He et al.): a strided 1x1 conv where the shape
    # changes, the identity elsewhere.
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))


class _Residual(nn.Module):
    downsample: nn.Module | None

    def shortcut(self, x: Tensor) -> Tensor:
        # After the main branch, as in torchvision, so summaries list layers in its order.
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_Residual):
    # Two 3x3 convs and a shortcut: ResNet-18/34. Output channels: planes.
    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, norm_layer: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = _projection(in_channels, planes, stride, norm_layer)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += self.shortcut(x)
        return self.relu(out)


class Bottleneck(_Residual):
    # 1x1 reduce, 3x3, 1x1 expand (x4) and a shortcut: ResNet-50/101/152. The stride sits on
    # the 3x3 conv as in torchvision ("ResNet v1.5"; the paper strides the first 1x1), which
    # is what torchvision's weights were trained with. Output channels: planes * 4.
    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, norm_layer: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride, norm_layer)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        out += self.shortcut(x)
        return self.relu(out)


class DenseLayer(nn.Module):
    # Pre-activation BN-ReLU-Conv twice (DenseNet-BC): a 1x1 bottleneck to bn_size * growth_rate
    # channels, then a 3x3 conv making growth_rate new channels.
    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = bn_size * growth_rate
        self.norm1 = norm_layer(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_channels, width)
        self.norm2 = norm_layer(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, growth_rate)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        # (B, in, H, W) -> (B, growth_rate, H, W)
        out = self.norm1(x)
        out = self.relu1(out)
        out = self.conv1(out)
        out = self.norm2(out)
        out = self.relu2(out)
        out = self.conv2(out)
        return F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out


class DenseBlock(nn.ModuleDict):
    # Each layer sees the concatenation of the block's input and every earlier layer's output;
    # children are denselayer1, denselayer2, ... Output: in + num_layers * growth_rate channels.
    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(
                    in_channels + i * growth_rate, growth_rate, bn_size, drop_rate, norm_layer
                )
                for i in range(num_layers)
            }
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    # Between dense blocks: BN-ReLU, a 1x1 conv to shrink the channels, 2x2 average pooling.
    def __init__(
        self, in_channels: int, out_channels: int, norm_layer: NormLayer | None = None
    ) -> None:
        norm_layer = norm_layer or nn.BatchNorm2d
        super().__init__(
            OrderedDict(
                norm=norm_layer(in_channels),
                relu=nn.ReLU(inplace=True),
                conv=conv1x1(in_channels, out_channels),
                pool=nn.AvgPool2d(2, stride=2),
            )
        )
