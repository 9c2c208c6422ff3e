"""The canvas every cnnlab figure is drawn on (``new_figure``, ``save_figure``) and the
figures of training: a run's learning curves, its picture grids (batch.png, validation
drawings), the learning-rate range test, and ``inspect --compare``'s cost chart. A finished
run's evaluation figures are in evaluation_plots.py, maps of what a network sees in
explain_plots.py.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting never
touches global GUI state and works in threads, notebooks and headless machines alike.
matplotlib is imported inside each function to keep ``import cnnlab`` fast.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

_MAX_PICTURES = 16


def plot_curves(
    metrics_csv: Path,
    out: Path,
    panels: dict[str, Sequence[str] | dict[str, str]],
    best_epoch: int | None = None,
) -> None:
    """One panel per entry of ``panels`` (title -> metrics.csv columns, one line each), from
    a run's ``metrics.csv``. A line is named by its label when the columns come as
    {column: label}, else "train"/"val" when the panel compares one metric on both splits,
    else by its column. ``best_epoch`` (the weights kept) is marked in every panel. Outliers
    (``spike_indices``: one epoch's value far above its neighbours', or a line that climbs
    far above where it started, as an overfitting model's val loss does) would flatten
    every other epoch: the axis stops short of them and a marker at the top edge gives each
    value. Every task's curves follow this one rule."""
    from matplotlib.ticker import MaxNLocator

    rows = _read_metrics(Path(metrics_csv))
    fig = new_figure((5 * len(panels), 4))
    epochs = [_number(row.get("epoch")) for row in rows]
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, columns) in zip(axes, panels.items(), strict=True):
        kept, spikes = [], []
        for column in columns:
            values = [_number(row.get(column)) for row in rows]
            # Markers make a one-epoch run visible as a point rather than nothing.
            line = ax.plot(
                epochs, values, marker="o", markersize=3, label=line_label(column, columns)
            )[0]
            spiked = spike_indices(values)
            spikes += [(epochs[i], values[i], line.get_color()) for i in spiked]
            kept += [v for i, v in enumerate(values) if i not in spiked and math.isfinite(v)]
        if spikes and kept:
            low, high = min(kept), max(kept)
            margin = 0.15 * (high - low or abs(high) or 1.0)
            top = high + margin
            # A spike of one line that the panel's other lines reach anyway (the first
            # val loss beside a higher train loss) is drawn where it is, not clipped.
            spikes = [spike for spike in spikes if spike[1] > top]
        if spikes and kept:
            ax.set_ylim(low - margin / 3, top)
            for epoch, value, colour in spikes:
                ax.plot([epoch], [top], marker="^", color=colour, clip_on=False)
                ax.annotate(
                    f"{value:.3g}", (epoch, top), textcoords="offset points", xytext=(6, -12),
                    fontsize=8, color=colour, bbox={"facecolor": "white", "edgecolor": "none"},
                )  # fmt: skip
        if best_epoch is not None and rows:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
            ax.text(
                best_epoch, 0.02, f" best: epoch {best_epoch}", transform=ax.get_xaxis_transform(),
                fontsize=8, color="dimgrey",
            )  # fmt: skip
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.25" ticks
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        if not rows:
            ax.text(0.5, 0.5, "no epochs yet", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, Path(out))


def spike_indices(values: list[float]) -> set[int]:
    """Indices of outliers: a value more than 3x each neighbour's and 3x the line's median
    (one spike), or, after the first epoch, more than 4x the line's first value (a line
    that climbs far above where it started: an overfitting model's val loss)."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 3:
        return set()
    median = sorted(finite)[len(finite) // 2]
    start = finite[0]
    found = set()
    for i, value in enumerate(values):
        if not math.isfinite(value) or value <= 0:
            continue
        neighbours = [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]
        neighbours = [v for v in neighbours if math.isfinite(v)]
        spike = bool(neighbours) and value > 3 * max(neighbours) and value > 3 * median
        climbed = i > 0 and start > 0 and value > 4 * start
        if spike or climbed:
            found.add(i)
    return found


def line_label(column: str, columns: Sequence[str] | dict[str, str]) -> str:
    """The legend name of ``column`` in a panel of ``columns`` (see ``plot_curves``)."""
    if isinstance(columns, dict):
        return columns[column]
    splits = [c.split("_", 1)[0] for c in columns]
    metrics = {c.split("_", 1)[-1] for c in columns}
    if len(metrics) == 1 and len(set(splits)) == len(columns):
        return column.split("_", 1)[0]
    return column


def plot_pictures(
    pictures: Sequence[tuple[torch.Tensor, str]],
    out: Path,
    title: str,
    columns: int = 4,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> None:
    """A grid of uint8 (C, H, W) pictures, each below its caption: a run's batch.png (the
    training images as the model sees them, augmented, with their labels) and its
    validation drawings; ``legend`` names colours (class name, RGB) below the grid."""
    shown = list(pictures)[:_MAX_PICTURES]
    cols = max(1, min(columns, len(shown)))
    # A wide picture (an image beside its class map) gets a wider column, not a smaller
    # scale: the text drawn into it stays at its own size.
    aspect = max([p.shape[-1] / p.shape[-2] for p, _ in shown] + [1.0])
    cells = []
    for picture, text in shown:
        pixels = picture.permute(1, 2, 0).numpy() / 255
        grey = pixels.shape[-1] == 1
        cells.append(
            (pixels[..., 0] if grey else pixels, textwrap.shorten(text, 40, placeholder="..."))
        )
    size = (3 * min(aspect, 3.0), 3.2)
    fig = picture_grid(cells, cols, size, title, "nothing to show", legend=bool(legend))
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(color=[c / 255 for c in rgb], label=name) for name, rgb in legend]
        fig.legend(handles=handles, loc="lower center", ncols=min(6, len(handles)))
    save_figure(fig, Path(out))


_GRID_TITLE = 0.4  # inches above the grid for the figure's title
_GRID_LEGEND = 0.5  # inches below it for a legend
_CAPTION_LINE = 8 * 1.25 / 72  # one line of an 8-point caption, in inches


def picture_grid(
    cells: Sequence[tuple[np.ndarray, str] | tuple[np.ndarray, str, str]],
    columns: int,
    cell: tuple[float, float],
    title: str,
    empty: str,
    legend: bool = False,
) -> Figure:
    """A figure of pictures in ``columns`` columns, each fitted into a ``cell`` (width,
    height in inches) under its 8-point caption, in the caption's colour when a cell gives
    one; ``title`` above them, ``empty`` in the middle when there are none, room for a
    legend below when ``legend``. A picture is (H, W) floats in [0, 1], drawn in grey, or
    (H, W, 3). Every picture is drawn into one set of axes that spans the figure, placed
    in inches: sixteen axes of their own, laid out by matplotlib's constrained layout,
    took 4x as long to draw (batch.png and errors.png were most of the demo's drawing)."""
    rows = max(1, math.ceil(len(cells) / columns))
    width = cell[0] * columns
    bottom = _GRID_LEGEND if legend else 0.0
    height = cell[1] * rows + _GRID_TITLE + bottom
    fig = new_figure((width, height), constrained=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    if not cells:
        fig.text(0.5, 0.5, empty, ha="center", va="center")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for slot, (pixels, caption, *colour) in enumerate(cells):
        row, col = divmod(slot, columns)
        lines = caption.count("\n") + 1
        # The picture's box in inches, y downwards: the caption above, a margin around.
        left, top = col * cell[0] + 0.05, _GRID_TITLE + row * cell[1] + lines * _CAPTION_LINE + 0.1
        box_width, box_height = cell[0] - 0.1, (row + 1) * cell[1] + _GRID_TITLE - 0.05 - top
        scale = min(box_width / pixels.shape[1], box_height / pixels.shape[0])
        shown_width, shown_height = pixels.shape[1] * scale, pixels.shape[0] * scale
        left += (box_width - shown_width) / 2
        ax.imshow(
            pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0,
            extent=(left, left + shown_width, top + shown_height, top),
        )  # fmt: skip
        ax.text(
            left + shown_width / 2, top - 0.04, caption, ha="center", va="bottom", fontsize=8,
            color=colour[0] if colour else "black", linespacing=1.1,
        )  # fmt: skip
    # imshow moved the limits to its last picture: the axes are the figure, in inches.
    ax.set_aspect("auto")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return fig


def plot_lr_find(
    lrs: Sequence[float], losses: Sequence[float], suggested: float, out: Path
) -> None:
    """Smoothed loss against learning rate (log axis), the suggestion marked."""
    fig = new_figure((6, 4))
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
    save_figure(fig, Path(out))


def plot_compare(rows: Sequence[dict], out: Path) -> None:
    """Parameters against MACs, one labelled point per model of ``inspect.compare``, the
    point's size growing with the model's depth."""
    fig = new_figure((7, 5))
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
    ax.set_xlabel("multiply-adds per image (G MACs; FLOPs: about twice, see the table)")
    ax.set_ylabel("parameters (M)")
    ax.set_title("parameters against cost (point size: depth)")
    ax.grid(alpha=0.3, which="both")
    ax.margins(0.25)
    save_figure(fig, Path(out))


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


def new_figure(size: tuple[float, float], constrained: bool = True) -> Figure:
    """A matplotlib figure of ``size`` inches on its own Agg canvas (no pyplot), laid out
    by matplotlib's constrained layout unless the caller places everything itself."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: Path) -> None:
    """``fig`` as a PNG (100 dpi) written atomically to ``out``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(out, buffer.getvalue())
