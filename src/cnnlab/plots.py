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

_CELL_TEXT_MAX_CLASSES = 20  # above this, numbers in cells are unreadable
_MAX_ERROR_IMAGES = 16


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
    fig = _new_figure((5 * len(panels), 4))
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
    _save(fig, Path(out))


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
    fig = _new_figure((side + 1.5, side))
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
    _save(fig, Path(out))


def plot_per_class_pr(per_class: dict[str, dict], out: Path) -> None:
    """Multi-label classification's picture in place of a confusion matrix: each label's
    precision and recall at its threshold, as paired horizontal bars (``per_class`` as
    ``metrics.multilabel_report`` gives it)."""
    names = list(per_class)
    k = len(names)
    height = min(max(1.5 + 0.35 * k, 3.0), 40.0)  # inches: ~0.35 in per label, bounded
    fig = _new_figure((7.0, height))
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
    _save(fig, Path(out))


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
    rows = max(1, math.ceil(shown / cols))
    fig = _new_figure(((5.5 if heats is not None else 3) * cols, 3.3 * rows + 0.4))
    if not shown:
        fig.text(0.5, 0.5, "no images to show", ha="center", va="center")
    order = "misclassified first (red), then" if wrong else "none misclassified;"
    fig.suptitle(
        f"true / predicted (p: the prediction's probability): {order} the highest losses"
        " (green: right)",
        fontsize=10,
    )
    for slot in range(shown):
        ax = fig.add_subplot(rows, cols, slot + 1)
        pixels = _denormalise(images[slot], mean, std)  # (H, W) or (H, W, 3) in [0, 1]
        if heats is not None:
            pixels = _beside_heat(pixels, heats[slot].numpy())
        ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0.0, vmax=1.0)
        names = textwrap.shorten(f"{true[slot]} / {pred[slot]}", 34, placeholder="...")
        colour = "tab:green" if true[slot] == pred[slot] else "tab:red"
        figures = f"(p={float(probs[slot]):.2f}, loss {float(losses[slot]):.2f})"
        ax.set_title(f"{names}\n{figures}", fontsize=8, color=colour)
        ax.axis("off")
    _save(fig, Path(out))


def _beside_heat(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, 2W + 2, 3): the image, a white gap, and the image half-covered by ``heat`` in the
    jet colour map."""
    import numpy as np
    from matplotlib import colormaps

    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
    overlay = 0.5 * rgb + 0.5 * colormaps["jet"](heat)[..., :3]
    gap = np.ones((rgb.shape[0], 2, 3))
    return np.concatenate([rgb, gap, overlay], axis=1)


def plot_pictures(
    pictures: Sequence[tuple[torch.Tensor, str]],
    out: Path,
    title: str,
    columns: int = 4,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> None:
    """A grid of uint8 (C, H, W) pictures, each above its caption: a run's batch.png (the
    training images as the model sees them, augmented, with their labels) and its
    validation drawings; ``legend`` names colours (class name, RGB) below the grid."""
    shown = list(pictures)[:_MAX_ERROR_IMAGES]
    cols = max(1, min(columns, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    # A wide picture (an image beside its class map) gets a wider column, not a smaller
    # scale: the text drawn into it stays at its own size.
    aspect = max([p.shape[-1] / p.shape[-2] for p, _ in shown] + [1.0])
    fig = _new_figure((3 * min(aspect, 3.0) * cols, 3.2 * rows + 0.4))
    fig.suptitle(title, fontsize=10)
    if not shown:
        fig.text(0.5, 0.5, "nothing to show", ha="center", va="center")
    for slot, (picture, text) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, slot + 1)
        pixels = picture.permute(1, 2, 0).numpy()
        grey = pixels.shape[-1] == 1
        ax.imshow(
            pixels[..., 0] if grey else pixels, cmap="gray" if grey else None, vmin=0, vmax=255
        )
        ax.set_title(textwrap.shorten(text, 40, placeholder="..."), fontsize=8)
        ax.axis("off")
    if legend:
        from matplotlib.patches import Patch

        handles = [Patch(color=[c / 255 for c in rgb], label=name) for name, rgb in legend]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)))
    _save(fig, Path(out))


def plot_pr_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    ap50: dict[str, float | None],
    out: Path,
) -> None:
    """Precision against recall at IoU 0.5, one line per class (its AP@0.5 in the legend),
    as a detection run's pr_curve.png."""
    fig = _new_figure((6, 5))
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


def plot_attribution(
    image: torch.Tensor,
    heat: np.ndarray,
    box: tuple[float, float, float, float],
    peak: tuple[float, float],
    title: str,
    out: Path,
) -> None:
    """An attribution map (H', W') in [0, 1] over the image (uint8 (C, H, W)), spread over
    ``box`` (x0, y0, x1, y1: the model's view of the image, outlined when it is not the
    whole image), its peak marked, with a colour bar."""
    from matplotlib.patches import Rectangle

    pixels = image.permute(1, 2, 0).numpy()
    fig = _new_figure((6, 5))
    ax = fig.subplots()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3], cmap="gray")
    x0, y0, x1, y1 = box
    shown = ax.imshow(
        heat,
        cmap="jet",
        alpha=0.5,
        vmin=0.0,
        vmax=1.0,
        extent=(x0, x1, y1, y0),
        interpolation="bilinear",
    )
    if (x0, y0, x1, y1) != (0, 0, pixels.shape[1], pixels.shape[0]):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1))
    ax.plot([peak[0]], [peak[1]], marker="+", color="white", markersize=14, mew=2)
    ax.set_xlim(0, pixels.shape[1])
    ax.set_ylim(pixels.shape[0], 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, label="attribution (1 = the map's peak)")
    _save(fig, Path(out))


def plot_box_attributions(
    image: torch.Tensor,
    panels: Sequence[tuple[np.ndarray, Sequence[float], tuple[float, float] | None, str]],
    view: tuple[float, float, float, float],
    title: str,
    out: Path,
) -> None:
    """One panel per detected box: its attribution map (H', W') in [0, 1] over the image
    (uint8 (C, H, W)), spread over ``view`` (the model's view of the image), the box
    outlined, the map's peak marked, titled; one colour bar for all. ``panels`` are (map,
    box (x0, y0, x1, y1) in the image's pixels, peak (x, y) or None, title); none: the
    image alone."""
    from matplotlib.patches import Rectangle

    pixels = image.permute(1, 2, 0).numpy()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]
    cols = max(1, min(4, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = _new_figure((3.2 * cols + 0.8, 3.2 * rows + 0.5))
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    shown = None
    x0, y0, x1, y1 = view
    for ax, (heat, box, peak, label) in zip(axes, panels, strict=False):
        ax.imshow(pixels, cmap="gray")
        shown = ax.imshow(
            heat,
            cmap="jet",
            alpha=0.5,
            vmin=0.0,
            vmax=1.0,
            extent=(x0, x1, y1, y0),
            interpolation="bilinear",
        )
        bx0, by0, bx1, by1 = box
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, color="white", lw=2))
        if peak is not None:
            ax.plot([peak[0]], [peak[1]], marker="+", color="white", markersize=12, mew=2)
        ax.set_xlim(0, pixels.shape[1])
        ax.set_ylim(pixels.shape[0], 0)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if not panels:
        axes[0].imshow(pixels, cmap="gray")
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), label="attribution (1 = the map's peak)", shrink=0.8)
    _save(fig, Path(out))


def plot_feature_maps(
    maps: Sequence[np.ndarray],
    channels: Sequence[tuple[int, float]],
    title: str,
    out: Path,
) -> None:
    """A grid of activation maps, each titled with its channel and mean activation, each on
    its own colour scale (viridis)."""
    cols = max(1, min(4, math.ceil(math.sqrt(len(maps)))))
    rows = max(1, math.ceil(len(maps) / cols))
    fig = _new_figure((2.4 * cols, 2.5 * rows + 0.4))
    fig.suptitle(title, fontsize=10)
    for slot, (grid, (channel, mean)) in enumerate(zip(maps, channels, strict=True)):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(grid, cmap="viridis")
        ax.set_title(f"channel {channel}, mean {mean:.3g}", fontsize=8)
        ax.axis("off")
    _save(fig, Path(out))


def plot_filters(panels: Sequence[tuple[str, torch.Tensor]], title: str, out: Path) -> None:
    """Convolution kernels (O, I, k, k) as image tiles, one panel per (label, kernels): each
    kernel scaled to [0, 1] on its own, RGB when it has 3 input channels, else its first
    input channel in grey."""
    count = panels[0][1].shape[0]
    cols = max(1, min(16, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / cols)
    fig = _new_figure((1.0 * cols * len(panels) + 0.5, 1.0 * rows + 0.8))
    fig.suptitle(title, fontsize=10)
    figures = fig.subfigures(1, len(panels), squeeze=False)[0]
    for sub, (label, kernels) in zip(figures, panels, strict=True):
        sub.suptitle(label, fontsize=9)
        for k in range(count):
            ax = sub.add_subplot(rows, cols, k + 1)
            kernel = kernels[k]
            low, high = kernel.min(), kernel.max()
            tile = ((kernel - low) / (high - low + 1e-12)).numpy()
            if tile.shape[0] == 3:
                ax.imshow(tile.transpose(1, 2, 0), interpolation="nearest")
            else:
                ax.imshow(tile[0], cmap="gray", interpolation="nearest")
            ax.axis("off")
    _save(fig, Path(out))


def plot_erf(fields: Sequence, title: str, out: Path) -> None:
    """One heat map per stage of ``inspect.erf.StageField``: the centre unit's input
    gradient, the theoretical receptive field (dashed) and the measured ERF square (solid)
    outlined around its centre."""
    from matplotlib.patches import Rectangle

    count = max(1, len(fields))
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig = _new_figure((3.2 * cols, 3.3 * rows + 0.5))
    fig.suptitle(title, fontsize=10)
    for slot, field in enumerate(fields):
        ax = fig.add_subplot(rows, cols, slot + 1)
        import numpy as np

        gradient = field.gradient.numpy()
        ax.imshow(gradient / max(float(gradient.max()), 1e-12), cmap="inferno")
        height, width = gradient.shape
        total = gradient.sum() or 1.0
        cy = float((gradient.sum(axis=1) * np.arange(height)).sum() / total)
        cx = float((gradient.sum(axis=0) * np.arange(width)).sum() / total)
        half = field.theoretical / 2
        ax.add_patch(
            Rectangle(
                (cx - half, cy - half), 2 * half, 2 * half, fill=False, color="cyan", ls="--", lw=1
            )
        )
        r = field.radius + 0.5
        ax.add_patch(
            Rectangle((round(cx) - r, round(cy) - r), 2 * r, 2 * r, fill=False, color="white", lw=1)
        )
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(
            f"{field.name} (stride {field.stride:g})\n"
            f"RF {field.theoretical:g}, ERF {field.effective}",
            fontsize=8,
        )
        ax.axis("off")
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
    ax.set_xlabel("multiply-adds per image (G MACs; FLOPs: about twice, see the table)")
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
    """(H, W) or (H, W, 3) floats in [0, 1] for imshow, of a normalised (C, H, W) image."""
    from cnnlab.draw import unnormalise

    pixels = unnormalise(image, mean, std).float() / 255
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
