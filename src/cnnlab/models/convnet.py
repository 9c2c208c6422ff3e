"""The notes' configurable ConvNet: for each entry of ``cdims`` a Conv-BN-ReLU-MaxPool-Dropout
stage, then an MLP with one hidden layer per entry of ``hdims``.

Layers carry readable running names (conv2d_00, batchnorm2d_01, relu_02, maxpool2d_03,
dropout2d_04, conv2d_05, ...) so a printed model or a per-layer summary reads like the
notes' parameter check.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.models.blocks import ConvBNAct, check_rate
from cnnlab.registry import register_model


def _ints(name: str, value: object, length: int | None = None) -> tuple[int, ...]:
    # A tuple or list of positive ints (YAML configs and the CLI give lists); a lone int is a
    # one-entry list, since `--hdims 128` on the command line parses as one.
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    ok = isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )
    if not ok or (length is not None and len(value) != length):
        shape = f"{length} " if length else ""
        raise CnnlabError(f"convnet: {name} must be {shape}positive ints, got {value!r}")
    return tuple(value)


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return _ints("img_size", [img_size] * 2, 2)
    return _ints("img_size", img_size, 2)


def _named(layers: list[nn.Module], start: int = 0) -> OrderedDict[str, nn.Module]:
    # "conv2d_00", "batchnorm2d_01", ...: the type's name and a running index.
    return OrderedDict(
        (f"{type(layer).__name__.lower()}_{i:02d}", layer) for i, layer in enumerate(layers, start)
    )


class ConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        img_size: int | Sequence[int],  # (H, W) or one int for square inputs
        ksize: int,  # odd, so that padding ksize // 2 keeps the size
        cdims: Sequence[int],  # output channels of each conv stage
        hdims: Sequence[int],  # width of each hidden linear layer
        dropout: float,  # after every conv stage (Dropout2d) and hidden layer
    ) -> None:
        super().__init__()
        height, width = _size(img_size)
        cdims, hdims = _ints("cdims", cdims), _ints("hdims", hdims)
        dropout = check_rate("convnet", "dropout", dropout)
        if not isinstance(ksize, int) or ksize < 1 or ksize % 2 == 0:
            raise CnnlabError(f"convnet: ksize must be a positive odd int, got {ksize!r}")
        shrink = 2 ** len(cdims)  # each stage halves H and W (floor)
        if height < shrink or width < shrink:
            raise CnnlabError(
                f"convnet: img_size {height}x{width} is too small for {len(cdims)} max-pools"
                f" (needs at least {shrink}x{shrink})"
            )

        conv_layers: list[nn.Module] = []
        channels = in_channels
        for cdim in cdims:
            conv_layers += ConvBNAct(channels, cdim, ksize, bias=True)
            conv_layers += [nn.MaxPool2d(2), nn.Dropout2d(dropout)]
            channels = cdim
        features = channels * (height // shrink) * (width // shrink)
        dense_layers: list[nn.Module] = [nn.Flatten()]
        for hdim in hdims:
            dense_layers += [nn.Linear(features, hdim), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            features = hdim
        dense_layers.append(nn.Linear(features, num_classes))

        self.features = nn.Sequential(_named(conv_layers))  # (B, C, H, W) -> (B, c, h, w)
        # The index runs on from the features': flatten_10, linear_11, ...
        self.classifier = nn.Sequential(_named(dense_layers, len(conv_layers)))
        self.fixed_input_size = (height, width)  # the first linear layer fixes it
        self.min_input_size = min(height, width)
        pools = [name for name, m in self.features.named_children() if isinstance(m, nn.MaxPool2d)]
        self.feature_info = [
            {"num_chs": cdim, "reduction": 2 ** (i + 1), "module": f"features.{name}"}
            for i, (cdim, name) in enumerate(zip(cdims, pools, strict=True))
        ]

        # The notes' init: He-normal weights, zero biases, BN as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, cdims[-1], H / 2**n, W / 2**n)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_agrees(name: str, value: int | None, wanted: int, source: str) -> None:
    if value is not None and value != wanted:
        raise CnnlabError(f"convnet: {name}={value} conflicts with {source}")


def _build(
    num_classes: int | None,
    in_channels: int | None,
    img_size: int | Sequence[int] | None,
    xdim: Sequence[int] | None,
    ydim: int | None,
    **kwargs: Any,
) -> ConvNet:
    # xdim=(C, H, W) and ydim are the notes' names for in_channels, img_size and num_classes.
    if xdim is not None:
        channels, *hw = _ints("xdim", xdim, 3)
        _check_agrees("in_channels", in_channels, channels, f"xdim={xdim}")
        if img_size is not None and _size(img_size) != tuple(hw):
            raise CnnlabError(f"convnet: img_size={img_size} conflicts with xdim={xdim}")
        in_channels, img_size = channels, hw
    if ydim is not None:
        _check_agrees("num_classes", num_classes, ydim, f"ydim={ydim}")
        num_classes = ydim
    return ConvNet(
        10 if num_classes is None else num_classes,
        1 if in_channels is None else in_channels,
        28 if img_size is None else img_size,
        **kwargs,
    )


@register_model(
    min_size=28,
    input_size=(1, 28, 28),
    head=("classifier",),
    pool="flatten",
    classifier=("classifier",),
    first_conv="features.conv2d_00",
    explain_layer="features",
)
def convnet(
    num_classes: int | None = None,  # default 10
    in_channels: int | None = None,  # default 1
    img_size: int | Sequence[int] | None = None,
    ksize: int = 3,
    cdims: Sequence[int] = (32, 64),
    hdims: Sequence[int] = (1024, 128),
    # 0.25 trains the built-in 8x8 digits to 99% test accuracy (40 epochs, Adam); 0.5 stalls
    # there (37% after 15 epochs).
    dropout: float = 0.25,
    xdim: Sequence[int] | None = None,
    ydim: int | None = None,
) -> ConvNet:
    """The notes' ConvNet for small images (28x28 digits by default).

    Each entry of ``cdims`` adds Conv(ksize, "same" padding)-BN-ReLU-MaxPool(2)-Dropout2d;
    then Flatten, Linear-ReLU-Dropout for each entry of ``hdims``, and a Linear to the classes.
    The first linear layer fixes the input size to ``img_size`` (an int or ``(H, W)``).
    ``xdim=(C, H, W)`` and ``ydim`` (the notes' names) stand in for ``in_channels``/
    ``img_size`` and ``num_classes``; an explicit value that disagrees raises CnnlabError.

        create_model("convnet", xdim=(1, 28, 28), ksize=3, cdims=(32, 64),
                     hdims=(1024, 128), ydim=10)
    """
    return _build(
        num_classes,
        in_channels,
        img_size,
        xdim,
        ydim,
        ksize=ksize,
        cdims=cdims,
        hdims=hdims,
        dropout=dropout,
    )
