"""Every task's training and evaluation transforms (torchvision.transforms.v2).

Each task has one training preset with one signature, ``(img_size, augment, flip, mean,
std)``, and an evaluation transform. Inputs are uint8 (C, H, W) images already in the
run's channel count (``cnnlab.data.images.read_image(path, in_channels)``); outputs are
normalised float images.

Classification evaluates with ``Resize(S)`` (shorter side) + ``CenterCrop(S)``, i.e.
timm's ``crop_pct=1.0``, not the ImageNet habit of resizing to S/0.875 and cropping: on
small or tightly framed images (32x32 digits, product photos) that habit cuts off strokes
and edges. Training presets keep most of the object for the same reason:

- ``none``: the evaluation transform.
- ``light``: RandomResizedCrop (scale 0.7..1, aspect ratio near 1), horizontal flip, mild
  ColorJitter.
- ``strong``: RandomResizedCrop (scale 0.25..1), flip, TrivialAugmentWide, stronger
  ColorJitter, GaussianBlur with probability 0.2.

- ``trivial``: the light crop and flip, then TrivialAugmentWide (one operation a picture at
  a random strength: rotations up to 135 degrees, shears, posterize, solarize, ...).
- ``randaugment``: the light crop and flip, then RandAugment (two operations at magnitude 9
  of 31: rotations up to 9 degrees), as timm's ``rand-m9``.

``flip=False`` says orientation carries meaning (digits, text): no flips, and ``strong``
uses a mild RandomAffine (10 degrees) instead of TrivialAugmentWide, whose rotations reach
135 degrees and would turn a 6 into a 9. ``trivial`` is that policy as asked for, flips or
not; ``randaugment`` stays mild enough for digits.

MixUp and CutMix mix whole batches (``batch_mix``), after collation.

Segmentation transforms (image, mask) pairs at the images' own scale and evaluates whole
images; detection resizes to a square and moves the boxes with every geometric step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cnnlab.config import AUGMENTS
from cnnlab.data.segment import IGNORE_INDEX
from cnnlab.errors import CnnlabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
_DETECT_FILL = 114  # grey for pixels that scale jitter uncovers (Ultralytics' choice)


# A gray image fine-tuned from RGB weights: ImageNet's statistics averaged over the three
# channels (timm's rule for in_chans=1). The first convolution's filters are summed over
# the channels (``weights.py``), which answers a gray image exactly as the RGB filters
# answer R = G = B; normalising it as ImageNet's average channel keeps the inputs on the
# scale those filters learnt.
IMAGENET_GRAY_MEAN = (round(sum(IMAGENET_MEAN) / 3, 3),)  # 0.449
IMAGENET_GRAY_STD = (round(sum(IMAGENET_STD) / 3, 3),)  # 0.226


def default_stats(
    in_channels: int, pretrained: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std): ImageNet's for 3 channels; for 1, ImageNet's averaged over channels
    when starting from (RGB) weights, else (0.5,)/(0.5,)."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if pretrained else (GRAY_MEAN, GRAY_STD)
    raise CnnlabError(f"in_channels must be 1 or 3, got {in_channels}")


def stats_line(in_channels: int, pretrained: bool) -> str:
    """The normalisation ``default_stats`` chose, and why, in one line."""
    mean, std = default_stats(in_channels, pretrained)
    shown = f"mean {', '.join(f'{m:g}' for m in mean)}, std {', '.join(f'{s:g}' for s in std)}"
    if in_channels == 3:
        why = "ImageNet's, as pretrained weights expect" if pretrained else "ImageNet's"
    elif pretrained:
        why = "ImageNet's averaged over its 3 channels, as the RGB weights expect of gray"
    else:
        why = "gray images from scratch: [0, 1] mapped to [-1, 1]"
    return f"normalisation: {shown} ({why})"


def _check(img_size: int | None, augment: str, allowed: Sequence[str] = AUGMENTS) -> None:
    if img_size is not None and img_size < 1:
        raise CnnlabError(f"image size must be positive, got {img_size}")
    if augment not in allowed:
        raise CnnlabError(f"unknown augment {augment!r}; choose one of {', '.join(allowed)}")


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    # Masks (and boxes) pass through ToDtype and Normalize untouched.
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    return [to_float, v2.Normalize(list(mean), list(std))]


# --- classification ------------------------------------------------------------------


class ClassifyEval:
    """``Resize(S)`` (shorter side), ``CenterCrop(S)``, ``ToDtype(float32, scale=True)``,
    ``Normalize``: the v2 kernels called in a row on a uint8 (C, H, W) tensor. A v2.Compose
    of the same four steps dispatches each through its pytree machinery, which on a 16x16
    digit costs more than the work itself."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size = img_size
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        size = [self.img_size, self.img_size]
        image = F.resize_image(image, [self.img_size], antialias=True)
        image = F.center_crop_image(image, size)
        image = F.to_dtype_image(image, torch.float32, scale=True)
        return F.normalize_image(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"ClassifyEval(size={self.img_size}, mean={self.mean}, std={self.std})"


class LightAugment:
    """The ``light`` preset on a uint8 (C, H, W) tensor: RandomResizedCrop (scale 0.7..1,
    aspect ratio 5/6..6/5), a horizontal flip with ``flip``, ColorJitter (brightness,
    contrast and saturation 0.2, in a random order), then to float and normalised.

    The random parameters and the kernels are torchvision's own (``make_params`` and
    ``transform`` of the v2 transforms); calling them directly skips v2.Compose's per-step
    dispatch, and jittering the float image skips the uint8 round trip ColorJitter makes at
    every step: 0.34 against 0.20 ms a 16x16 digit, 1.7 against 0.95 ms at 224x224 RGB
    (one thread)."""

    def __init__(
        self, img_size: int, flip: bool, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.crop = v2.RandomResizedCrop(img_size, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))
        self.flip = flip
        self.jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.crop.transform(image, self.crop.make_params([image]))
        if self.flip and torch.rand(1).item() < 0.5:
            image = F.horizontal_flip_image(image)
        image = F.to_dtype_image(image, torch.float32, scale=True)
        image = self.jitter.transform(image, self.jitter.make_params([image]))
        return F.normalize_image(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"LightAugment({self.crop}, flip={self.flip}, {self.jitter}, mean={self.mean})"


def classify_eval(img_size: int, mean: Sequence[float], std: Sequence[float]) -> ClassifyEval:
    """Resize the shorter side to ``img_size``, centre-crop a square, normalise."""
    _check(img_size, "none")
    return ClassifyEval(img_size, mean, std)


def classify_train(
    img_size: int,
    augment: str,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random training transform for ``augment`` (see the module doc)."""
    _check(img_size, augment)
    if augment == "none":
        return classify_eval(img_size, mean, std)
    if augment == "light":
        return LightAugment(img_size, flip, mean, std)
    if augment in ("trivial", "randaugment"):
        steps = [v2.RandomResizedCrop(img_size, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.TrivialAugmentWide() if augment == "trivial" else v2.RandAugment())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        return v2.Compose(steps)
    # strong. Crops stay near square: the final resize to S x S would otherwise stretch the
    # object.
    steps: list[Callable] = [
        v2.RandomResizedCrop(img_size, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3))
    ]
    if flip:
        steps += [v2.RandomHorizontalFlip(), v2.TrivialAugmentWide()]
    else:
        steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5))
    hue = 0.1 if len(mean) == 3 else 0.0
    kernel = max(3, img_size // 10 | 1)  # odd, about a tenth of the image
    steps += [
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=hue),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def batch_mix(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a collated (images, labels) batch into (images, soft labels
    (B, K)) with Beta(alpha, alpha) weights; with both, each batch takes one at random
    (timm's switch probability 0.5). None when both alphas are 0."""
    mixes = [
        mix(alpha=alpha, num_classes=num_classes)
        for mix, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix))
        if alpha > 0
    ]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


# --- segmentation --------------------------------------------------------------------


def segment_eval(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalise only: evaluation and prediction run on whole images at their own size."""
    return v2.Compose(_normalise(mean, std))


def segment_train(
    img_size: int | None,
    augment: str,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """Joint (image, mask) augmentation at the images' own scale: geometry moves both, colour
    touches the image only; then a random ``img_size`` x ``img_size`` crop (padded with the
    ignore label where the image is smaller; None: the whole image).

    ``none``: crop and flips only; ``light``: rescaling by 0.8-1.25 (no stretching: an aspect
    change would turn circles into ellipses) and mild colour jitter; ``strong``: rescaling by
    0.6-1.5, rotations up to 15 degrees and stronger jitter."""
    _check(img_size, augment, ("none", "light", "strong"))
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    steps: list = []
    if augment == "light":
        steps += [v2.RandomAffine(0, scale=(0.8, 1.25), fill=fill), v2.ColorJitter(0.2, 0.2, 0.2)]
    elif augment == "strong":
        steps += [v2.RandomAffine(15, scale=(0.6, 1.5), fill=fill), v2.ColorJitter(0.4, 0.4, 0.4)]
    if img_size is not None:
        steps.append(v2.RandomCrop(img_size, pad_if_needed=True, fill=fill))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_normalise(mean, std)])


# --- detection -----------------------------------------------------------------------


def detect_eval(img_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize to ``img_size`` square (boxes follow) and normalise."""
    return detect_train(img_size, "none", False, mean, std)


def detect_train(
    img_size: int,
    augment: str,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """Resize to ``img_size`` square, then (``light``) colour jitter, horizontal flip (unless
    ``flip`` is off) and scale/translate jitter that move the boxes along; boxes that leave
    the image go. Detection has no ``strong`` recipe."""
    _check(img_size, augment, ("none", "light"))
    steps: list = [v2.Resize((img_size, img_size), antialias=True)]
    if augment == "light":
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [
            # YOLOv1's recipe: random scaling and translation of up to 20% of the image.
            v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2), fill=_DETECT_FILL),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=2.0),
        ]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)
