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

import itertools
import math
import platform
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as Fn
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


_LIGHT_SCALE = (0.7, 1.0)
_LIGHT_RATIO = (5 / 6, 6 / 5)
_LIGHT_JITTER = 0.2  # brightness, contrast and saturation factors drawn from 1 -/+ this
_CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before it falls back to a centre crop
# torchvision resizes uint8 images natively (rounding inside the kernel) where the CPU has
# the vector kernel, else through float32 and round(): F.resize_image's rule.
_NATIVE_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or (
    platform.machine() in ("aarch64", "arm64")
)
# Luma weights of torchvision's rgb_to_grayscale (contrast's mean, saturation's blend).
_LUMA = (0.2989, 0.587, 0.114)
_JITTER_OPS = ("brightness", "contrast", "saturation")
_JITTER_ORDERS = tuple(itertools.permutations(_JITTER_OPS))
_UINT8_SCALE = np.float32(1 / 255)  # to_dtype_image's factor for uint8
_ZERO, _ONE = np.float32(0), np.float32(1)
_SUM = np.add.reduce  # ndarray.sum without its Python-level wrapper


class LightParams(NamedTuple):
    """One image's draw for ``LightAugment``: the crop box, the flip, the jitter factors
    and the order the three jitter steps run in."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    order: tuple[str, ...]
    brightness: float
    contrast: float
    saturation: float


class LightAugment:
    """The ``light`` preset on a uint8 (C, H, W) tensor: RandomResizedCrop (scale 0.7..1,
    aspect ratio 5/6..6/5, then ``img_size`` square, bilinear with antialiasing), a
    horizontal flip with probability 0.5 when ``flip``, ColorJitter (brightness, contrast
    and saturation factors uniform in 0.8..1.2, in a random order, each clamped to [0, 1];
    saturation leaves one channel alone), then normalised.

    Written by hand because it runs once per training sample (25,000 times in the demo)
    and torchvision's transforms spend most of a small image's time around the work:
    ``make_params`` calls the generator once a number, each kernel goes through dispatch
    and checks, and each torch op on a 16x16 image costs more in its call than in its
    arithmetic. Here one ``torch.rand`` a sample (torch's default generator, which the
    loader seeds per sample) feeds the distributions of ``v2.RandomResizedCrop.make_params``
    (its ten tries and centre-crop fallback included) and ``v2.ColorJitter.make_params``;
    the crop is a slice and one ``interpolate`` call (the one ``F.resize_image`` makes,
    uint8 in and out, rounded as it rounds); jitter and normalisation are in-place NumPy
    float32 operations on the one float copy (a ufunc call costs about a third of a torch
    op's), in torchvision's formulas: ``x * f`` and ``x * f + other * (1 - f)`` clamped
    to [0, 1], contrast against the mean of the luma image, then ``(x - mean) / std``.

    tests/data/test_light_augment.py proves that for the same parameters the image is
    torchvision's (``RandomResizedCrop.transform``, flip, ``to_dtype_image``,
    ``ColorJitter.transform``, ``normalize_image``) within 1e-6 of a [0, 1] pixel, gray and
    RGB, every jitter order and branch, square and odd sizes above and below ``img_size``;
    that the draws follow ``make_params``' distributions (crop position, area and ratio
    against torchvision's own draws, flip rate, factors, all six orders, the fallback box);
    and that a seed repeats an image. The random stream differs from torchvision's, so a
    seed gives other crops than before: the demo's test accuracy over seeds 0, 1, 2 went
    from 99.72, 99.16, 99.44% to 99.16, 99.44, 99.44%. Measured on one thread (CPU time,
    busy 2-core machine): 466 -> 144 us a 16x16 digit, 2030 -> 1270 us at 224x224 RGB as
    decoded images are laid out (benchmarks/loader.py)."""

    def __init__(
        self, img_size: int, flip: bool, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.img_size = img_size
        self.flip = flip
        self.mean, self.std = list(mean), list(std)
        self._mean = np.array(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.array(self.std, dtype=np.float32).reshape(-1, 1, 1)
        self._luma = np.array(_LUMA, dtype=np.float32)
        self._log_ratio = (math.log(_LIGHT_RATIO[0]), math.log(_LIGHT_RATIO[1]))

    def draw(self, height: int, width: int) -> LightParams:
        """The random parameters for a ``height`` x ``width`` image, from one call to
        torch's default generator."""
        u = torch.rand(2 * _CROP_ATTEMPTS + 7, dtype=torch.float64).tolist()
        area = height * width
        low, high = _LIGHT_SCALE
        log_low, log_high = self._log_ratio
        for attempt in range(_CROP_ATTEMPTS):
            target_area = area * (low + (high - low) * u[2 * attempt])
            ratio = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
            w = round(math.sqrt(target_area * ratio))
            h = round(math.sqrt(target_area / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(u[-7] * (height - h + 1))
                left = int(u[-6] * (width - w + 1))
                break
        else:  # centre crop of the whole image, brought within the ratio range
            in_ratio = width / height
            if in_ratio < _LIGHT_RATIO[0]:
                w, h = width, round(width / _LIGHT_RATIO[0])
            elif in_ratio > _LIGHT_RATIO[1]:
                w, h = round(height * _LIGHT_RATIO[1]), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        low, high = 1 - _LIGHT_JITTER, 1 + _LIGHT_JITTER
        return LightParams(
            top=top,
            left=left,
            height=h,
            width=w,
            flip=self.flip and u[-5] < 0.5,
            order=_JITTER_ORDERS[int(u[-4] * len(_JITTER_ORDERS))],
            brightness=low + (high - low) * u[-3],
            contrast=low + (high - low) * u[-2],
            saturation=low + (high - low) * u[-1],
        )

    def apply(self, image: torch.Tensor, params: LightParams) -> torch.Tensor:
        """``image`` cropped, resized, flipped, jittered and normalised as ``params`` say."""
        p = params
        crop = image[None, :, p.top : p.top + p.height, p.left : p.left + p.width]
        pixels = _resize_square(crop, self.img_size).numpy()[0]
        if p.flip:
            pixels = pixels[..., ::-1]
        # The float image, (C, H, W) in memory whatever the layout the resize left: for
        # uint8, to_dtype_image's .to(float32) * (1 / 255).
        scale = _UINT8_SCALE if pixels.dtype == np.uint8 else _int_scale(pixels.dtype)
        x = np.multiply(pixels, scale, dtype=np.float32, order="C")
        rgb = x.shape[0] == 3
        for op in p.order:
            if op == "brightness":
                x *= np.float32(p.brightness)
                if p.brightness > 1:  # else x * f <= x <= 1 already, rounding included
                    np.minimum(x, _ONE, out=x)
            elif op == "contrast":  # a blend with the gray image's mean
                if rgb:
                    mean = float(self._luma @ _SUM(x.reshape(3, -1), axis=1)) / x[0].size
                else:
                    mean = float(_SUM(x, axis=None)) / x.size
                x *= np.float32(p.contrast)
                x += np.float32(mean * (1 - p.contrast))
                np.clip(x, _ZERO, _ONE, out=x)
            elif rgb:  # saturation, a blend with the gray image; none for one channel
                gray = (self._luma @ x.reshape(3, -1)).reshape(1, *x.shape[1:])
                x *= np.float32(p.saturation)
                gray *= np.float32(1 - p.saturation)
                x += gray
                np.clip(x, _ZERO, _ONE, out=x)
        x -= self._mean
        x /= self._std
        return torch.from_numpy(x)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.apply(image, self.draw(image.shape[-2], image.shape[-1]))

    def __repr__(self) -> str:
        return (
            f"LightAugment(size={self.img_size}, scale={_LIGHT_SCALE}, ratio=(5/6, 6/5),"
            f" flip={self.flip}, jitter={_LIGHT_JITTER}, mean={self.mean}, std={self.std})"
        )


def _int_scale(dtype: np.dtype) -> np.floating:
    """to_dtype_image's factor from an integer image to [0, 1] floats (1 for floats)."""
    return np.float32(1 / np.iinfo(dtype).max if dtype.kind in "ui" else 1)


def _resize_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """A (1, C, H, W) ``batch`` resized to ``size`` x ``size``, bilinear with antialiasing:
    the ``interpolate`` call torchvision's ``resize_image`` makes, uint8 natively where it
    does so (else through float32, rounded), the batch itself when already that size."""
    if batch.shape[-2:] == (size, size):
        return batch
    numel = batch.numel()
    if batch.dtype == torch.uint8 and batch.shape[1] == 3:
        # The uint8 kernel works on channels-last pixels and repacks other layouts on the
        # way in and back on the way out: handing it the crop channels-last halves its
        # time at 224x224 (same values). Where the crop already is channels-last (a decoded
        # JPEG), torchvision's restride keeps interpolate from allocating its output
        # contiguous, which would cost a repacking copy.
        if not batch.is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        elif batch.stride(0) != numel:
            batch = batch.as_strided(batch.shape, (numel, *batch.stride()[1:]))
    dtype = batch.dtype
    cast = not (dtype.is_floating_point or (dtype == torch.uint8 and _NATIVE_UINT8_RESIZE))
    if cast:
        batch = batch.to(torch.float32)
    out = Fn.interpolate(
        batch, size=[size, size], mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().to(dtype) if cast else out


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
