"""Maps of what a network sees, drawn over images or as tiles: a class's probability per
window (``cnnlab heatmap``), an attribution map (``cnnlab explain``), activation maps and
convolution kernels (``cnnlab features``), and effective receptive fields."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cnnlab.plots import new_figure, save_figure

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage


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
    fig = new_figure((6, 5))
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
    save_figure(fig, Path(out))


def _display_pixels(image: torch.Tensor) -> np.ndarray:
    """A uint8 (C, H, W) image as imshow takes it: (H, W) for gray, (H, W, 3) for colour."""
    pixels = image.permute(1, 2, 0).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]


def _draw_map(ax: Axes, pixels: np.ndarray, heat: np.ndarray, view: Sequence[float]) -> AxesImage:
    """The image in gray and an attribution map (H', W') in [0, 1] over it in jet at half
    opacity, spread over ``view`` (x0, y0, x1, y1), as every explain picture draws them;
    the axes limited to the image. Pixel edges sit at integers, as the map's extent, boxes
    and peaks have them (imshow's default puts them at half pixels, shifting the image half
    a pixel). Returns the map's image, for a colour bar."""
    height, width = pixels.shape[:2]
    ax.imshow(pixels, cmap="gray", extent=(0, width, height, 0))
    x0, y0, x1, y1 = view
    shown = ax.imshow(
        heat,
        cmap="jet",
        alpha=0.5,
        vmin=0.0,
        vmax=1.0,
        extent=(x0, x1, y1, y0),
        interpolation="bilinear",
    )
    ax.set_xlim(0, width)  # also stops the marks drawn next from rescaling the axes
    ax.set_ylim(height, 0)
    return shown


def plot_attribution(
    image: torch.Tensor,
    heat: np.ndarray,
    box: tuple[float, float, float, float],
    peak: tuple[float, float] | None,
    title: str,
    out: Path,
) -> None:
    """An attribution map (H', W') in [0, 1] over the image (uint8 (C, H, W)), spread over
    ``box`` (x0, y0, x1, y1: the model's view of the image, outlined when it is not the
    whole image), its peak marked, with a colour bar."""
    from matplotlib.patches import Rectangle

    pixels = _display_pixels(image)
    fig = new_figure((6, 5))
    ax = fig.subplots()
    shown = _draw_map(ax, pixels, heat, box)
    x0, y0, x1, y1 = box
    if (x0, y0, x1, y1) != (0, 0, pixels.shape[1], pixels.shape[0]):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1))
    if peak is not None:  # an all-zero map has none
        ax.plot([peak[0]], [peak[1]], marker="+", color="white", markersize=14, mew=2)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, label="attribution (1 = the map's peak)")
    save_figure(fig, Path(out))


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

    pixels = _display_pixels(image)
    cols = max(1, min(4, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = new_figure((3.2 * cols + 0.8, 3.2 * rows + 0.5))
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    shown = None
    for ax, (heat, box, peak, label) in zip(axes, panels, strict=False):
        shown = _draw_map(ax, pixels, heat, view)
        bx0, by0, bx1, by1 = box
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, color="white", lw=2))
        if peak is not None:
            ax.plot([peak[0]], [peak[1]], marker="+", color="white", markersize=12, mew=2)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if not panels:
        axes[0].imshow(pixels, cmap="gray")
    if shown is not None:
        fig.colorbar(shown, ax=list(axes), label="attribution (1 = the map's peak)", shrink=0.8)
    save_figure(fig, Path(out))


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
    fig = new_figure((2.4 * cols, 2.5 * rows + 0.4))
    fig.suptitle(title, fontsize=10)
    for slot, (grid, (channel, mean)) in enumerate(zip(maps, channels, strict=True)):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(grid, cmap="viridis")
        ax.set_title(f"channel {channel}, mean {mean:.3g}", fontsize=8)
        ax.axis("off")
    save_figure(fig, Path(out))


def plot_filters(panels: Sequence[tuple[str, torch.Tensor]], title: str, out: Path) -> None:
    """Convolution kernels (O, I, k, k) as image tiles, one panel per (label, kernels): each
    kernel scaled to [0, 1] on its own, RGB when it has 3 input channels, else its first
    input channel in grey."""
    count = panels[0][1].shape[0]
    cols = max(1, min(16, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / cols)
    fig = new_figure((1.0 * cols * len(panels) + 0.5, 1.0 * rows + 0.8))
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
    save_figure(fig, Path(out))


def plot_erf(fields: Sequence, title: str, out: Path) -> None:
    """One heat map per stage of ``inspect.erf.StageField``: the centre unit's input
    gradient, the theoretical receptive field (dashed) and the measured ERF square (solid)
    outlined around its centre."""
    from matplotlib.patches import Rectangle

    count = max(1, len(fields))
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig = new_figure((3.2 * cols, 3.3 * rows + 0.5))
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
    save_figure(fig, Path(out))
