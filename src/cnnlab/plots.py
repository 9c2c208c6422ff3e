"""Every figure cnnlab draws with matplotlib: a run folder's learning curves, confusion
matrix and worst test errors, heat maps and the learning-rate range test.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting never
touches global GUI state and works in threads, notebooks and headless machines alike.
matplotlib is imported inside each function to keep ``import cnnlab`` fast.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

_CELL_TEXT_MAX_CLASSES = 20  # above this, numbers in cells are unreadable
_MAX_ERROR_IMAGES = 16


def plot_curves(
    metrics_csv: Path, out: Path, panels: dict[str, Sequence[str] | dict[str, str]]
) -> None:
    """One panel per entry of ``panels`` (title -> metrics.csv columns, one line each), from
    a run's ``metrics.csv``. A line is named by its label when the columns come as
    {column: label}, else "train"/"val" when the panel compares one metric on both splits,
    else by its column."""
    from matplotlib.ticker import MaxNLocator

    rows = _read_metrics(Path(metrics_csv))
    fig = _new_figure((5 * len(panels), 4))
    epochs = [_number(row.get("epoch")) for row in rows]
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, columns) in zip(axes, panels.items(), strict=True):
        for column in columns:
            values = [_number(row.get(column)) for row in rows]
            # Markers make a one-epoch run visible as a point rather than nothing.
            ax.plot(epochs, values, marker="o", markersize=3, label=line_label(column, columns))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.25" ticks
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        if not rows:
            ax.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=ax.transAxes)
    _save(fig, Path(out))


def line_label(column: str, columns: Sequence[str] | dict[str, str]) -> str:
    """The legend name of ``column`` in a panel of ``columns`` (see ``plot_curves``)."""
    if isinstance(columns, dict):
        return columns[column]
    splits = [c.split("_", 1)[0] for c in columns]
    metrics = {c.split("_", 1)[-1] for c in columns}
    if len(metrics) == 1 and len(set(splits)) == len(columns):
        return column.split("_", 1)[0]
    return column


def plot_confusion(matrix: torch.Tensor, classes: list[str], out: Path) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class)."""
    counts = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {tuple(counts.shape)} for {k} classes")
    # Each row sums to 1 (recall per class on the diagonal); empty rows stay 0.
    normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)

    side = min(max(2.5 + 0.22 * k, 5.0), 40.0)  # inches: ~0.2 in per class, bounded
    # Tick labels fill at most ~half of each class's row (72 pt per inch, ~80% is the axes).
    fontsize = min(max(0.5 * side * 72 * 0.8 / max(k, 1), 2.0), 10.0)
    fig = _new_figure((side + 1.5, side))
    ax = fig.subplots()
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = list(range(k))
    ax.set_xticks(ticks, labels=classes, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=classes, fontsize=fontsize)
    label_size = max(10.0, side / 2)  # stays readable when a large figure is scaled down
    ax.set_xlabel("predicted", fontsize=label_size)
    ax.set_ylabel("true", fontsize=label_size)
    title = f"confusion matrix ({int(counts.sum())} images, rows normalised)"
    ax.set_title(title, fontsize=label_size)
    if k <= _CELL_TEXT_MAX_CLASSES:
        for (row, col), value in _cells(normalised):
            colour = "white" if value > 0.5 else "black"
            ax.text(
                col, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=fontsize
            )
    fig.colorbar(image, ax=ax, fraction=0.3 / side)  # a bar ~0.3 inch wide at any size
    _save(fig, Path(out))


def plot_errors(
    images: Sequence[torch.Tensor],
    true: Sequence[str],
    pred: Sequence[str],
    losses: Sequence[float],
    out: Path,
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """A grid of the highest-loss images, each titled "true: X / pred: Y (loss)".

    ``images`` are normalised (C, H, W) tensors as the model saw them; ``mean`` and ``std``
    undo that normalisation for display. At most 16 images are shown, worst first.
    """
    if not len(images) == len(true) == len(pred) == len(losses):
        raise ValueError("images, true, pred and losses must have the same length")
    worst = sorted(range(len(images)), key=lambda i: -float(losses[i]))[:_MAX_ERROR_IMAGES]
    cols = max(1, min(4, math.ceil(math.sqrt(len(worst)))))
    rows = max(1, math.ceil(len(worst) / cols))
    fig = _new_figure((3 * cols, 3.2 * rows))
    if not worst:
        fig.text(0.5, 0.5, "no test images to show", ha="center", va="center")
    for slot, i in enumerate(worst):
        ax = fig.add_subplot(rows, cols, slot + 1)
        pixels = _denormalise(images[i], mean, std)  # (H, W) or (H, W, 3) in [0, 1]
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0)
        ax.set_title(f"true: {true[i]} / pred: {pred[i]} ({float(losses[i]):.2f})", fontsize=8)
        ax.axis("off")
    _save(fig, Path(out))


def plot_heatmap(
    image: torch.Tensor,
    grid: np.ndarray,
    extent: tuple[float, float, float, float],
    class_name: str,
    out: Path,
) -> None:
    """A class's probability map (H', W') over the image (uint8 (C, H, W)), the map's cells
    spread over ``extent`` (left, right, bottom, top in pixels), with a colour bar."""
    pixels = image.permute(1, 2, 0).numpy()
    fig = _new_figure((6, 5))
    ax = fig.subplots()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3], cmap="gray")
    shown = ax.imshow(
        grid, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear"
    )
    ax.set_xlim(0, pixels.shape[1])
    ax.set_ylim(pixels.shape[0], 0)
    ax.set_axis_off()
    ax.set_title(f"P({class_name}) per window")
    fig.colorbar(shown, ax=ax, label="probability")
    _save(fig, Path(out))


def plot_lr_find(
    lrs: Sequence[float], losses: Sequence[float], suggested: float, out: Path
) -> None:
    """Smoothed loss against learning rate (log axis), the suggestion marked."""
    fig = _new_figure((6, 4))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.axvline(suggested, color="tab:red", linestyle="--")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(f"learning-rate range test (suggested {suggested:.1e})")
    ax.grid(alpha=0.3)
    finite = [loss for loss in losses if math.isfinite(loss)]
    if finite:
        # The whole way down to the minimum shows; the explosion after it is clipped.
        low = min(finite)
        high = max(finite[: finite.index(low) + 1])
        if high > low:
            ax.set_ylim(low - 0.1 * (high - low), high + 0.3 * (high - low))
    _save(fig, Path(out))


def plot_compare(rows: Sequence[dict], out: Path) -> None:
    """Parameters against MACs, one labelled point per model of ``inspect.compare``, the
    point's size growing with the model's depth."""
    fig = _new_figure((7, 5))
    ax = fig.subplots()
    macs = [row["macs"] / 1e9 for row in rows]
    params = [row["params"] / 1e6 for row in rows]
    sizes = [20 + 2 * row["depth"] for row in rows]
    ax.scatter(macs, params, s=sizes, alpha=0.7, color="tab:blue")
    middle = math.sqrt(min(macs) * max(macs))  # the log axis's centre
    by_cost = sorted(range(len(rows)), key=macs.__getitem__)
    for rank, i in enumerate(by_cost):
        label = f"{rows[i]['model']}\n{rows[i]['depth']} layers, {rows[i]['fc_share']:.0%} in FC"
        right = macs[i] > middle  # labels point inwards, so none runs off the figure
        below = rank % 2 == 1  # neighbours in cost alternate above and below their points
        ax.annotate(
            label,
            (macs[i], params[i]),
            textcoords="offset points",
            xytext=(-8 if right else 8, -22 if below else 6),
            ha="right" if right else "left",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("multiply-adds per image (G)")
    ax.set_ylabel("parameters (M)")
    ax.set_title("parameters against cost (point size: depth)")
    ax.grid(alpha=0.3, which="both")
    ax.margins(0.25)
    _save(fig, Path(out))


def _read_metrics(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise CnnlabError(f"{path}: cannot read metrics ({e.strerror or e})") from e


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _cells(matrix: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    rows, cols = matrix.shape
    return [((r, c), float(matrix[r, c])) for r in range(rows) for c in range(cols)]


def _denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    image = image.detach().float().cpu()  # (C, H, W)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    pixels = (image * std_t + mean_t).clamp(0.0, 1.0)
    if pixels.shape[0] == 1:
        return pixels[0].numpy()  # (H, W): drawn with the grey colour map
    return pixels[:3].permute(1, 2, 0).numpy()  # (H, W, 3)


def _new_figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(out, buffer.getvalue())
