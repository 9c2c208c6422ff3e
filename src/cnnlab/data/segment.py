"""Semantic segmentation data: image/mask folders, their split, the dataset and batching
(the joint image/mask transforms are in ``cnnlab.data.transforms``).

Layout::

    DIR/classes.txt          one class name per line; line 0 is the background
    DIR/images/NAME.png|jpg  the images
    DIR/masks/NAME.png       one class index per pixel (grayscale or VOC-style palette PNG,
                             whose palette *indices* are the classes); 255 = ignore

or ``DIR/train`` and ``DIR/val`` each holding ``images/`` and ``masks/`` (``classes.txt``
stays in DIR). Without them a seeded random split is made and saved in the run's split.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors

from cnnlab.data.images import check_pixels, image_size, read_image
from cnnlab.data.listing import require_folder, walk_files
from cnnlab.data.splits import read_split_file, split_items, split_member
from cnnlab.errors import CnnlabError
from cnnlab.files import read_text

IGNORE_INDEX = 255  # mask value excluded from the loss and the metrics
_CACHE_BYTES = 1 << 30  # decode everything into memory when it fits in this

SegSample = tuple[Path, Path]  # (image path, mask path)


@dataclass
class SegSplits:
    """Which image/mask pairs train and which validate, and the class names."""

    root: Path
    classes: list[str]
    train: list[SegSample]
    val: list[SegSample]
    seed: int
    val_split: float
    presplit: bool  # True when DIR/train and DIR/val were given

    def to_json(self) -> dict:
        """Paths relative to the root, for RUN/split.json."""

        def rel(samples: list[SegSample]) -> list[list[str]]:
            return [
                [str(i.relative_to(self.root)), str(m.relative_to(self.root))] for i, m in samples
            ]

        return {
            "root": str(self.root),
            "classes": self.classes,
            "train": rel(self.train),
            "val": rel(self.val),
            "seed": self.seed,
            "val_split": self.val_split,
            "presplit": self.presplit,
        }

    @classmethod
    def from_json(cls, path: Path) -> SegSplits:
        """The splits a run saved in ``path`` (its split.json), checked key by key."""
        data, root = read_split_file(path)
        try:

            def absolute(pairs: list[list[str]]) -> list[SegSample]:
                return [
                    (split_member(root, image, path), split_member(root, mask, path))
                    for image, mask in pairs
                ]

            return cls(
                root,
                [str(name) for name in data["classes"]],
                absolute(data["train"]),
                absolute(data["val"]),
                int(data["seed"]),
                float(data["val_split"]),
                bool(data["presplit"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CnnlabError(f"{path}: not a cnnlab split file ({error})") from None


def read_classes(root: Path) -> list[str]:
    """Class names from ``root/classes.txt`` (index 0 is the background)."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise CnnlabError(f"{path}: missing; write one class name per line, background first")
    classes = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(classes) < 2:
        raise CnnlabError(f"{path}: needs at least two classes (background and one more)")
    if len(set(classes)) != len(classes):
        raise CnnlabError(f"{path}: class names repeat")
    return classes


def scan_pairs(folder: Path) -> list[SegSample]:
    """Every image under ``folder/images`` paired with the mask of the same relative path
    and stem under ``folder/masks`` (``images/a/x.jpg`` -> ``masks/a/x.png``)."""
    images_dir, masks_dir = Path(folder) / "images", Path(folder) / "masks"
    for required in (images_dir, masks_dir):
        if not required.is_dir():
            raise CnnlabError(f"{required}: folder not found (expected images/ and masks/)")
    images = walk_files(images_dir)[0]
    if not images:
        raise CnnlabError(f"{images_dir}: no image files")

    def mask_of(image: Path) -> Path:
        return (masks_dir / image.relative_to(images_dir)).with_suffix(".png")

    missing = [p.relative_to(images_dir).as_posix() for p in images if not mask_of(p).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CnnlabError(f"{masks_dir}: no mask NAME.png for {shown}")
    return [(p.resolve(), mask_of(p).resolve()) for p in images]


def make_seg_splits(root: str | Path, val_split: float = 0.1, seed: int = 0) -> SegSplits:
    """DIR/train + DIR/val when present, else a seeded split of DIR/images
    (``cnnlab.data.splits.split_items``)."""
    root = require_folder(root).resolve()
    classes = read_classes(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = scan_pairs(root / "train"), scan_pairs(root / "val")
        return SegSplits(root, classes, train, val, seed, val_split, presplit=True)
    pairs = scan_pairs(root)
    train, val, _ = split_items(pairs, val_split, 0.0, seed, name=str(root / "images"))
    return SegSplits(root, classes, train, val, seed, val_split, presplit=False)


def read_mask(path: Path, num_classes: int) -> torch.Tensor:
    """A mask file as int64 (H, W) class indices; palette PNGs give their palette indices.
    Only a regular file within the pixel limit is decoded (``cnnlab.data.images``)."""
    check_pixels(image_size(path), path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            # Turned by its EXIF orientation, as its image is (``read_image``).
            values = np.array(ImageOps.exif_transpose(image))
    except Exception as error:  # PIL raises many types for broken files
        raise CnnlabError(f"{path}: not a readable mask PNG ({error})") from None
    if mode in ("RGB", "RGBA"):
        if (
            not (values[..., 0] == values[..., 1]).all()
            or not (values[..., 0] == values[..., 2]).all()
        ):
            raise CnnlabError(
                f"{path}: colour mask; save class indices (grayscale or palette PNG) instead"
            )
        values = values[..., 0]
    if values.ndim != 2:
        raise CnnlabError(f"{path}: mask must have one channel, got mode {mode}")
    mask = torch.from_numpy(values.astype(np.int64))
    bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
    if bad.numel():
        raise CnnlabError(
            f"{path}: mask value {int(bad.max())} but only {num_classes} classes "
            f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)"
        )
    return mask


def check_pairs(samples: Sequence[SegSample], num_classes: int) -> None:
    """Fail early, naming the file, on a mask whose size or values do not fit its image."""
    for image_path, mask_path in samples:
        mask = read_mask(mask_path, num_classes)
        width, height = image_size(image_path)
        if tuple(mask.shape) != (height, width):
            raise CnnlabError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path.name} is {width}x{height}"
            )


class SegmentationDataset(torch.utils.data.Dataset):
    """(image float (C, H, W), mask int64 (H, W)) pairs through a joint transform."""

    def __init__(
        self,
        samples: Sequence[SegSample],
        transform: Callable,
        num_classes: int,
        in_channels: int = 3,
        cache: bool | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.cache = _fits_in_memory(self.samples) if cache is None else cache
        self._decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded, untransformed (uint8 image (C, H, W), int64 mask (H, W))."""
        if index in self._decoded:
            return self._decoded[index]
        image_path, mask_path = self.samples[index]
        image = read_image(image_path, self.in_channels)
        mask = read_mask(mask_path, self.num_classes)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise CnnlabError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{image_path.name} is {image.shape[2]}x{image.shape[1]}"
            )
        if self.cache:
            self._decoded[index] = (image, mask)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _fits_in_memory(samples: list[SegSample]) -> bool:
    if not samples:
        return False
    width, height = image_size(samples[0][0])
    return len(samples) * width * height * 12 < _CACHE_BYTES  # 3 bytes image + 8 mask + slack


def collate_pad(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of different sizes: images padded with 0, masks with the ignore index."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], height, width)
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image  # (C, h, w)
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks
