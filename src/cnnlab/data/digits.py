"""The built-in real data set: scikit-learn's handwritten digits as a class-folder tree.

``load_digits`` ships with scikit-learn (no download): 1,797 8x8 images with 17 grey levels
(0..16), written as 8-bit grayscale PNGs ``DST/<digit>/<NNNN>.png`` (NNNN is the index in
``load_digits``), upscaled with bicubic interpolation so the strokes stay smooth.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnlab.destinations import staged_folder
from cnnlab.errors import CnnlabError

MAX_LEVEL = 16  # load_digits grey levels are 0..16


def digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, size, size), labels (N,)): ``sklearn.datasets.load_digits``."""
    if not 8 <= size <= 1024:
        raise CnnlabError(f"digit image size must be between 8 and 1024, got {size}")
    table = bundled_digits()
    images = torch.from_numpy(table[:, :-1]).float().reshape(-1, 1, 8, 8) / MAX_LEVEL
    if size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bicubic", align_corners=False
        )
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)  # bicubic overshoots
    return pixels, torch.from_numpy(table[:, -1]).long()


def bundled_digits() -> np.ndarray:
    """scikit-learn's digits.csv.gz (N, 65): 64 grey levels, then the digit; what
    ``load_digits`` reads, read without importing scikit-learn, whose import (scipy's
    statistics and sparse matrices) took longer than writing the 1,797 PNGs."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise CnnlabError("the digits come with scikit-learn, which is not installed")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a scikit-learn that keeps its data elsewhere: its own reader
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        return np.column_stack([images, labels]).astype(np.float64)
    with gzip.open(path, "rt") as text:
        return np.loadtxt(text, delimiter=",", dtype=np.float64)


def write_digits(dst: Path, size: int = 32) -> dict[str, int]:
    """Write the digits to ``dst/<digit>/NNNN.png``; returns {digit: count}.

    ``dst`` must be new or empty (CnnlabError otherwise); the tree is written beside it and
    renamed into place, so an interrupted run leaves no partial ``dst``.
    """
    images, labels = digit_images(size)
    with staged_folder(dst) as staging:
        for digit in range(10):
            (staging / str(digit)).mkdir()
        for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            Image.fromarray(image[0].numpy()).save(staging / str(label) / f"{index:04d}.png")
    counts = torch.bincount(labels, minlength=10).tolist()
    return {str(digit): count for digit, count in enumerate(counts)}
