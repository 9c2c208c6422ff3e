"""Class-probability heat maps: a classification run's model, convolutionalized, run once
over an image larger than it was trained on.

The image is preprocessed like evaluation (channels, scaling, normalisation) but keeps its
own size, so the fully convolutional copy returns one score vector per window (or per
feature cell for global-pooling models); a softmax over classes in each cell gives the map.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms import v2

from cnnlab.convolutionalize import FullyConvolutional, convolutionalize
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.runs import load_run


def heatmap(
    run: str | Path,
    image: str | Path,
    class_name: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """The probability map of one class over ``image`` (default: the class whose map peaks
    highest), optionally drawn over the image into the PNG ``out``.

    Returns ``{"class", "map": [[p, ...], ...], "shape": [H', W'], "peak": [row, col],
    "prob": p at the peak, "peak_box": [x0, y0, x1, y1]}`` where ``peak_box`` is the input
    region (pixels) the peak cell scores. An image smaller than the training size is first
    enlarged to it (shorter side).
    """
    loaded = load_run(run, device)
    if loaded.task.name != "classify":
        raise CnnlabError(f"{run}: heat maps come from classification runs, not {loaded.task.name}")
    task = loaded.task
    pixels = _at_least(read_image(Path(image), task.in_channels), task.img_size)  # uint8 (C, H, W)
    x = v2.functional.to_dtype(pixels, torch.float32, scale=True)
    x = v2.functional.normalize(x, list(task.mean), list(task.std))  # (C, H, W)
    model = convolutionalize(loaded.model).to(loaded.device).eval()
    with torch.inference_mode():
        probs = model(x[None].to(loaded.device)).softmax(dim=1)[0].cpu()  # (K, H', W')
    if class_name is None:
        index = int(probs.flatten(1).amax(dim=1).argmax())
    elif class_name in loaded.classes:
        index = loaded.classes.index(class_name)
    else:
        raise CnnlabError(
            f"unknown class {class_name!r}; the run knows {', '.join(loaded.classes)}"
        )
    grid = probs[index]  # (H', W')
    row, col = divmod(int(grid.argmax()), grid.shape[1])
    boxes = CellBoxes(model, tuple(pixels.shape[-2:]), tuple(grid.shape))
    result = {
        "class": loaded.classes[index],
        "map": [[round(float(p), 6) for p in line] for line in grid.tolist()],
        "shape": list(grid.shape),
        "peak": [row, col],
        "prob": float(grid[row, col]),
        "peak_box": boxes.box(row, col),
    }
    if out is not None:
        from cnnlab.plots import plot_heatmap

        plot_heatmap(pixels, grid.numpy(), boxes.extent(), loaded.classes[index], Path(out))
    return result


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


def _at_least(image: torch.Tensor, size: int) -> torch.Tensor:
    if min(image.shape[-2:]) >= size:
        return image
    return v2.functional.resize(image, size, antialias=True)
