"""A finished run's evaluation figures: the confusion matrix and worst errors of a
classifier (confusion.png, errors.png), per-label precision and recall of a multi-label one
(per_class.png), a detector's precision-recall curves (pr_curve.png)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnnlab.plots import new_figure, picture_grid, save_figure

if TYPE_CHECKING:
    import numpy as np

_CELL_TEXT_MAX_CLASSES = 20  # above this, numbers in cells are unreadable
_MAX_ERROR_IMAGES = 16


def plot_confusion(matrix: torch.Tensor, classes: list[str], out: Path) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class); each
    non-empty cell gives its count of images over its fraction of the row (up to
    ``_CELL_TEXT_MAX_CLASSES`` classes; past that the colours alone)."""
    counts = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {tuple(counts.shape)} for {k} classes")
    # Each row sums to 1 (recall per class on the diagonal); empty rows stay 0.
    normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)

    side = min(max(2.5 + 0.22 * k, 5.0), 40.0)  # inches: ~0.2 in per class, bounded
    # Tick labels fill at most ~half of each class's row (72 pt per inch, ~80% is the axes).
    fontsize = min(max(0.5 * side * 72 * 0.8 / max(k, 1), 2.0), 10.0)
    fig = new_figure((side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = list(range(k))
    ax.set_xticks(ticks, labels=classes, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=classes, fontsize=fontsize)
    label_size = max(10.0, side / 2)  # stays readable when a large figure is scaled down
    ax.set_xlabel("predicted", fontsize=label_size)
    ax.set_ylabel("true", fontsize=label_size)
    title = f"confusion matrix ({int(counts.sum())} images; colour: fraction of the true class)"
    ax.set_title(title, fontsize=label_size)
    if k <= _CELL_TEXT_MAX_CLASSES:
        # Two lines per cell: the font shrinks with the cell, within legible bounds.
        cell_font = min(max(fontsize * 0.9, 4.0), 9.0)
        for (row, col), value in _cells(normalised):
            count = int(counts[row, col])
            if count == 0:
                continue  # an empty cell stays blank: the mistakes stand out
            colour = "white" if value > 0.5 else "black"
            ax.text(
                col, row, f"{count:,}\n{value:.2f}", ha="center", va="center", color=colour,
                fontsize=cell_font, linespacing=1.0,
            )  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.3 / side)  # a bar ~0.3 inch wide at any size
    save_figure(fig, Path(out))


def plot_per_class_pr(per_class: dict[str, dict], out: Path) -> None:
    """Multi-label classification's picture in place of a confusion matrix: each label's
    precision and recall at its threshold, as paired horizontal bars (``per_class`` as
    ``metrics.multilabel_report`` gives it)."""
    names = list(per_class)
    k = len(names)
    height = min(max(1.5 + 0.35 * k, 3.0), 40.0)  # inches: ~0.35 in per label, bounded
    fig = new_figure((7.0, height))
    ax = fig.subplots()
    rows = list(range(k))
    precision = [per_class[n]["precision"] for n in names]
    recall = [per_class[n]["recall"] for n in names]
    ax.barh([r - 0.2 for r in rows], precision, height=0.4, label="precision", color="tab:blue")
    ax.barh([r + 0.2 for r in rows], recall, height=0.4, label="recall", color="tab:orange")
    labels = [
        f"{n} (t={per_class[n]['threshold']:.2f}, n={per_class[n]['support']})" for n in names
    ]
    ax.set_yticks(rows, labels=labels)
    ax.invert_yaxis()  # the first label on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("at each label's threshold t")
    ax.set_title("per-label precision and recall")
    fig.legend(loc="outside lower center", ncols=2)  # below the axes: never over a bar
    save_figure(fig, Path(out))


def plot_errors(
    images: Sequence[torch.Tensor],
    true: Sequence[str],
    pred: Sequence[str],
    probs: Sequence[float],
    losses: Sequence[float],
    out: Path,
    mean: Sequence[float],
    std: Sequence[float],
    heats: Sequence[torch.Tensor] | None = None,
) -> None:
    """A grid of the images to look at first, as fastai's ``plot_top_losses``: each titled
    "true / pred" and "(p=0.83, loss 1.54)", the predicted class's probability and the
    image's loss, in red when the prediction is wrong and green when right, in the order
    given (misclassified first, then by loss).

    ``images`` are normalised (C, H, W) tensors as the model saw them; ``mean`` and ``std``
    undo that normalisation for display. At most 16 images are shown. ``heats`` (a map
    (H, W) in [0, 1] per image: Grad-CAM of the predicted class) are drawn over a copy of
    each image, beside it.
    """
    if not len(images) == len(true) == len(pred) == len(probs) == len(losses):
        raise ValueError("images, true, pred, probs and losses must have the same length")
    shown = min(len(images), _MAX_ERROR_IMAGES)
    wrong = sum(t != p for t, p in zip(true, pred, strict=True))
    cols = max(1, min(4, math.ceil(math.sqrt(shown))))
    cells = []
    for slot in range(shown):
        pixels = _denormalise(images[slot], mean, std)  # (H, W) or (H, W, 3) in [0, 1]
        if heats is not None:
            pixels = _beside_heat(pixels, heats[slot].numpy())
        names = textwrap.shorten(f"{true[slot]} / {pred[slot]}", 34, placeholder="...")
        colour = "tab:green" if true[slot] == pred[slot] else "tab:red"
        figures = f"(p={float(probs[slot]):.2f}, loss {float(losses[slot]):.2f})"
        cells.append((pixels, f"{names}\n{figures}", colour))
    order = "misclassified first (red), then" if wrong else "none misclassified;"
    title = (
        f"true / predicted (p: the prediction's probability): {order} the highest losses"
        " (green: right)"
    )
    size = (5.5 if heats is not None else 3, 3.3)
    save_figure(picture_grid(cells, cols, size, title, "no images to show"), Path(out))


def _beside_heat(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, 2W + 2, 3): the image, a white gap, and the image half-covered by ``heat`` in the
    jet colour map."""
    import numpy as np
    from matplotlib import colormaps

    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    overlay = 0.5 * rgb + 0.5 * colormaps["jet"](heat)[..., :3]
    gap = np.ones((rgb.shape[0], 2, 3))
    return np.concatenate([rgb, gap, overlay], axis=1)


def plot_pr_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    ap50: dict[str, float | None],
    out: Path,
) -> None:
    """Precision against recall at IoU 0.5, one line per class (its AP@0.5 in the legend),
    as a detection run's pr_curve.png."""
    fig = new_figure((6, 5))
    ax = fig.subplots()
    for name, (recall, precision) in curves.items():
        ap = ap50.get(name)
        ax.plot(recall, precision, label=f"{name} (AP@0.5 {ap:.3f})" if ap is not None else name)
    if not curves:
        ax.text(0.5, 0.5, "no labelled objects", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall at IoU 0.5 (validation)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    save_figure(fig, Path(out))


def _cells(matrix: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    rows, cols = matrix.shape
    return [((r, c), float(matrix[r, c])) for r in range(rows) for c in range(cols)]


def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """(H, W) or (H, W, 3) floats in [0, 1] for imshow, of a normalised (C, H, W) image."""
    from cnnlab.draw import unnormalise

    pixels = unnormalise(image, mean, std).float() / 255
    if pixels.shape[0] == 1:
        return pixels[0].numpy()  # (H, W): drawn with the grey colour map
    return pixels[:3].permute(1, 2, 0).numpy()  # (H, W, 3)
