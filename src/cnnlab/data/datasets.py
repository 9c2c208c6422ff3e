"""Datasets over (path, label) samples that survive bad images, and class-balance helpers.

An unreadable image never stops training: ``ImageDataset`` logs one warning naming the file
(``logging.getLogger("cnnlab")``) and returns ``None``; ``collate_skip_bad`` drops the
``None`` items. A batch whose items are all bad collates to two empty tensors
(``labels.numel() == 0``), which the training loop must skip.

With ``num_workers > 0`` every worker holds its own copy of the dataset, so an uncached bad
file is reported once per worker; cached datasets decode (and warn) once, up front.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate

from cnnlab.data.folders import BadImageError, Sample, read_image

log = logging.getLogger("cnnlab")

CACHE_LIMIT_BYTES = 1 << 30  # decode once into memory when the set is estimated below this
_PROBE_IMAGES = 8  # images decoded to estimate the decoded size of the whole set


def _estimate_bytes(samples: Sequence[Sample]) -> int:
    """Decoded uint8 size of the set, from the median of a few images spread through it."""
    step = max(1, len(samples) // _PROBE_IMAGES)
    sizes = []
    for path, _ in samples[::step][:_PROBE_IMAGES]:
        try:
            sizes.append(read_image(path).numel())
        except BadImageError:
            continue
    return int(statistics.median(sizes) * len(samples)) if sizes else 0


class ImageDataset(Dataset):
    """``dataset[i]`` -> (transformed image, label), or ``None`` when the file is unreadable.

    ``cache=None`` decodes every image once into memory (uint8) when the estimated decoded
    size is below ``CACHE_LIMIT_BYTES`` (1 GiB); True/False force it. The transform still
    runs on every access, so random augmentation differs each epoch.
    """

    def __init__(
        self, samples: Sequence[Sample], transform: Callable, cache: bool | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self._reported: set[str] = set()
        if cache is None:
            cache = _estimate_bytes(self.samples) < CACHE_LIMIT_BYTES
        self._images: list[torch.Tensor | None] | None = (
            [self._decode(path) for path, _ in self.samples] if cache else None
        )

    @property
    def cached(self) -> bool:
        return self._images is not None

    def _decode(self, path: Path) -> torch.Tensor | None:
        try:
            return read_image(path)
        except BadImageError as err:
            if str(path) not in self._reported:
                self._reported.add(str(path))
                log.warning("skipping unreadable image %s", err)
            return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        image = self._images[index] if self._images is not None else self._decode(path)
        if image is None:
            return None
        return self.transform(image), label


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs, dropping ``None``; all bad -> two empty tensors."""
    good = [item for item in batch if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(good)


def _labels(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.tensor([label for _, label in samples], dtype=torch.long)  # (N,)


def _class_counts(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    return torch.bincount(_labels(samples), minlength=num_classes).float()  # (num_classes,)


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights with mean 1 over the classes present (absent: 0)."""
    counts = _class_counts(samples, num_classes)
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    return weights * present.sum() / weights.sum()


def balanced_sampler(
    samples: Sequence[Sample], num_classes: int, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draws ``len(samples)`` samples per epoch with replacement, each class equally often."""
    counts = _class_counts(samples, num_classes)
    per_sample = (1.0 / counts.double())[_labels(samples)]  # (N,)
    return WeightedRandomSampler(
        per_sample, num_samples=len(samples), replacement=True, generator=generator
    )
