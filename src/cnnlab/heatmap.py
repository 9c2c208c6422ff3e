"""Class-probability heat maps: a classification run's model, convolutionalized, run once
over an image larger than it was trained on.

The image is preprocessed like evaluation (channels, scaling, normalisation) but keeps its
own size, so the fully convolutional copy returns one score vector per window (or per
feature cell for global-pooling models); a softmax over classes in each cell gives the map.
``class_maps(run, image)`` computes every class's map of one decoded image for a loaded run;
``heatmap`` (the ``cnnlab heatmap`` command) and ``cnnlab serve`` both call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from cnnlab.data.images import read_image
from cnnlab.dense_to_conv import FullyConvolutional, convolutionalize
from cnnlab.destinations import check_targets
from cnnlab.errors import CnnlabError
from cnnlab.runs import Run, load_run


def heatmap(
    run: str | Path,
    image: str | Path,
    class_name: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """The probability map of one class over ``image`` (default: the class whose map peaks
    highest), optionally drawn over the image into the PNG ``out`` (never ``image``
    itself; an existing file only with ``overwrite``).

    Returns ``{"class", "map": [[p, ...], ...], "shape": [H', W'], "peak": [row, col],
    "prob": p at the peak, "peak_box": [x0, y0, x1, y1], "peak_xy": [x, y]}`` where
    ``peak_box`` is the region the peak cell scores and ``peak_xy`` its centre, both in the
    image's own pixels. An image smaller than the training size is first enlarged to it
    (shorter side) and the map computed on that, but the box is given in the image as read.
    """
    if out is not None:
        check_targets([Path(out)], [Path(image)], overwrite)
    loaded = load_run(run, device)
    maps = class_maps(loaded, read_image(Path(image), loaded.task.in_channels))
    index = maps.index(class_name)
    if out is not None:
        from cnnlab.explain_plots import plot_heatmap

        grid = maps.probs[index].numpy()
        plot_heatmap(maps.pixels, grid, maps.boxes.extent(), maps.classes[index], Path(out))
    return maps.result(index)


def fully_convolutional(run: Run) -> FullyConvolutional:
    """The run's classifier as a fully convolutional copy on its device, in eval mode;
    CnnlabError for a run of another task or a model that does not convert."""
    if run.task.name != "classify":
        raise CnnlabError(
            f"{run.path}: heat maps come from classification runs, not {run.task.name}"
        )
    return convolutionalize(run.model).to(run.device).eval()


@dataclass
class ClassMaps:
    """Every class's probability in each cell of one image's map."""

    probs: torch.Tensor  # (K, H', W') softmax over the classes in each cell
    pixels: torch.Tensor  # uint8 (C, H, W): the image as mapped (resized when it had to be)
    boxes: CellBoxes  # where each cell looks in ``pixels``
    classes: list[str]
    image_size: tuple[int, int]  # (H, W) of the image as given, before any resizing

    def index(self, class_name: str | None = None) -> int:
        """The index of ``class_name``, or (None) of the class whose map peaks highest."""
        if class_name is None:
            return int(self.probs.flatten(1).amax(dim=1).argmax())
        if class_name not in self.classes:
            raise CnnlabError(
                f"unknown class {class_name!r}; the run knows {', '.join(self.classes)}"
            )
        return self.classes.index(class_name)

    def result(self, index: int) -> dict:
        """``heatmap``'s document for the class at ``index``."""
        grid = self.probs[index]  # (H', W')
        row, col = divmod(int(grid.argmax()), grid.shape[1])
        # The window is found in the pixels as mapped; a user reads it in the image's own.
        (height, width), (mapped_h, mapped_w) = self.image_size, self.pixels.shape[-2:]
        sx, sy = width / mapped_w, height / mapped_h
        x0, y0, x1, y1 = self.boxes.box(row, col)
        box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        return {
            "class": self.classes[index],
            "cells": self.boxes.describe(),
            "warning": self.boxes.warning(),
            "map": [[round(float(p), 6) for p in line] for line in grid.tolist()],
            "shape": list(grid.shape),
            "peak": [row, col],
            "prob": float(grid[row, col]),
            "peak_box": [round(v, 2) for v in box],
            "peak_xy": [round((box[0] + box[2]) / 2, 2), round((box[1] + box[3]) / 2, 2)],
        }


def class_maps(
    run: Run,
    image: torch.Tensor,
    model: FullyConvolutional | None = None,
    max_pixels: int | None = None,
) -> ClassMaps:
    """Every class's probability map over ``image`` (uint8 (C, H, W), the run's channels).

    ``model`` is ``fully_convolutional(run)`` (made here when not given; a caller mapping
    many images makes it once). With ``max_pixels``, which bounds the time and memory one
    map takes, a larger image is first shrunk to that many pixels (aspect kept). An image
    whose shorter side is below the training size is then enlarged to it; one so elongated
    that this takes it over ``max_pixels`` is a CnnlabError.
    """
    model = model if model is not None else fully_convolutional(run)
    task = run.task
    pixels = _fit(image, task.img_size, max_pixels)  # uint8 (C, H, W)
    x = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    x = v2.functional.normalize(x, list(task.mean), list(task.std))  # (C, H, W)
    with torch.inference_mode():
        probs = model(x[None].to(run.device)).softmax(dim=1)[0].float().cpu()  # (K, H', W')
    boxes = CellBoxes(model, tuple(pixels.shape[-2:]), tuple(probs.shape[-2:]))
    return ClassMaps(probs, pixels, boxes, list(run.classes), tuple(image.shape[-2:]))


class CellBoxes:
    """Where each map cell looks in the input: a sliding window for flatten heads, a tile of
    an even grid for pooled heads."""

    def __init__(self, model: FullyConvolutional, image: tuple[int, int], grid: tuple[int, int]):
        self.window = model.window
        self.image, self.grid = image, grid

    def _axis(self, axis: int) -> tuple[float, float, float]:
        """(centre of the first cell, spacing between centres, cell width) in pixels."""
        extent, cells = self.image[axis], self.grid[axis]
        if self.window is None:
            spacing = extent / cells
            return spacing / 2, spacing, spacing
        spacing = (extent - self.window) / (cells - 1) if cells > 1 else float(self.window)
        return self.window / 2, spacing, float(self.window)

    def describe(self) -> str:
        """What one cell of the map scores, in words."""
        (_, dy, height), (_, dx, _) = self._axis(0), self._axis(1)
        if self.window is None:
            return (
                f"one feature cell of the model's last map (a {height:g}-pixel tile of the"
                " image, every cell seeing the whole image through the global pool's field)"
            )
        return f"a {self.window}-pixel window (the training size) every {max(dy, dx):g} pixels"

    def warning(self) -> str | None:
        """Why the map may mislead, where it may: a globally pooled model never saw a single
        cell's features alone in training, so a cell's probability is not what the model
        says about that part of the image (``cnnlab explain`` maps that)."""
        if self.window is not None:
            return None
        return (
            "this model pools globally: each cell is one feature cell scored alone, not a"
            " window the model was trained on, so its probabilities are not the model's view"
            " of that region; `cnnlab explain RUN IMAGE` (Grad-CAM) shows where the"
            " prediction's evidence lies"
        )

    def box(self, row: int, col: int) -> list[float]:
        """[x0, y0, x1, y1] in image pixels."""
        (y, dy, height), (x, dx, width) = self._axis(0), self._axis(1)
        cy, cx = y + row * dy, x + col * dx
        return [
            round(v, 2) for v in (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
        ]

    def extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) for imshow: one spacing-wide square per cell centre."""
        (y, dy, _), (x, dx, _) = self._axis(0), self._axis(1)
        bottom = y + (self.grid[0] - 0.5) * dy
        right = x + (self.grid[1] - 0.5) * dx
        return x - dx / 2, right, bottom, y - dy / 2


def _fit(image: torch.Tensor, size: int, max_pixels: int | None) -> torch.Tensor:
    """``image`` scaled (aspect kept) to at most ``max_pixels`` pixels, then so that its
    shorter side is at least ``size``; unchanged when it fits."""
    height, width = image.shape[-2:]
    short, long = sorted((height, width))
    if max_pixels is not None and short * long > max_pixels:
        scale = math.sqrt(max_pixels / (short * long))
        short, long = max(1, int(short * scale)), max(1, int(long * scale))
    if short < size:  # torchvision's rule for resize(image, size): the longer side floored
        short, long = size, int(size * long / short)
        if max_pixels is not None and short * long > max_pixels:
            raise CnnlabError(
                f"a {width}x{height} image is too elongated for a heat map: at a shorter side"
                f" of {size} pixels it has more than {max_pixels:,}"
            )
    target = [short, long] if height <= width else [long, short]
    if target == [height, width]:
        return image
    return v2.functional.resize(image, target, antialias=True)
