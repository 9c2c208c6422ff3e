"""Train and evaluation transforms: uint8 (C, H, W) in, normalised float (in_channels, S, S) out.

Evaluation is ``Resize(S)`` (shorter side) + ``CenterCrop(S)``, i.e. timm's ``crop_pct=1.0``,
not the ImageNet habit of resizing to S/0.875 and cropping: on small or tightly framed
images (32x32 digits, product photos) that habit cuts off strokes and edges, and it gains
little on user data. Training presets keep most of the object for the same reason.

Presets (training only):
- ``none``: the evaluation transform.
- ``light``: RandomResizedCrop (scale 0.7..1, aspect ratio near 1), horizontal flip, mild
  ColorJitter.
- ``strong``: RandomResizedCrop (scale 0.25..1), flip, TrivialAugmentWide, stronger
  ColorJitter, GaussianBlur with probability 0.2.

``flip=False`` says orientation carries meaning (digits, text): no flips, and ``strong``
uses a mild RandomAffine (10 degrees) instead of TrivialAugmentWide, whose rotations reach
135 degrees and would turn a 6 into a 9.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cnnlab.errors import CnnlabError

AUGMENTS = ("none", "light", "strong")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)


def default_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): ImageNet's for 3 channels, (0.5,)/(0.5,) for 1."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return GRAY_MEAN, GRAY_STD
    raise CnnlabError(f"in_channels must be 1 or 3, got {in_channels}")


class ToChannels(torch.nn.Module):
    """uint8 (C, H, W), C in {1, 3, 4} -> (in_channels, H, W): grey repeated or RGB averaged."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise CnnlabError(f"in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = in_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] == 4:
            image = image[..., :3, :, :]  # drop alpha
        channels = image.shape[-3]
        if channels == self.in_channels:
            return image
        if channels == 1:
            return F.grayscale_to_rgb(image)
        return F.rgb_to_grayscale(image)


def _stats(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Sequence[float], Sequence[float]]:
    default_mean, default_std = default_stats(in_channels)
    mean = default_mean if mean is None else tuple(mean)
    std = default_std if std is None else tuple(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise CnnlabError(f"mean/std need {in_channels} value(s), got {list(mean)}/{list(std)}")
    return mean, std


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _check_size(img_size: int) -> None:
    if img_size < 1:
        raise CnnlabError(f"image size must be positive, got {img_size}")


def eval_transform(
    img_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_channels: int = 3,
) -> v2.Compose:
    """Resize the shorter side to ``img_size``, centre-crop a square, normalise."""
    _check_size(img_size)
    mean, std = _stats(in_channels, mean, std)
    return v2.Compose(
        [
            ToChannels(in_channels),
            v2.Resize(img_size, antialias=True),
            v2.CenterCrop(img_size),
            *_finish(mean, std),
        ]
    )


def train_transform(
    img_size: int,
    augment: str = "light",
    flip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_channels: int = 3,
) -> v2.Compose:
    """Random training transform for ``augment`` in none/light/strong (see the module doc)."""
    if augment not in AUGMENTS:
        raise CnnlabError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return eval_transform(img_size, mean, std, in_channels)
    _check_size(img_size)
    mean, std = _stats(in_channels, mean, std)
    strong = augment == "strong"
    # Crops stay near square: the final resize to S x S would otherwise stretch the object.
    ratio = (3 / 4, 4 / 3) if strong else (5 / 6, 6 / 5)
    steps: list[Callable] = [
        ToChannels(in_channels),
        v2.RandomResizedCrop(img_size, scale=(0.25 if strong else 0.7, 1.0), ratio=ratio),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if strong:
        steps.append(
            v2.TrivialAugmentWide()
            if flip
            else v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5)
        )
    jitter = 0.4 if strong else 0.2
    hue = 0.1 if strong and in_channels == 3 else 0.0
    steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue))
    if strong:
        kernel = max(3, img_size // 10 | 1)  # odd, about a tenth of the image
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.2))
    return v2.Compose(steps + _finish(mean, std))
