"""Synthetic shapes: circles, squares and triangles on textured backgrounds.

One generator feeds two tasks. ``task="segment"`` writes ``images/``, ``masks/`` (one class
index per pixel: 0 background, 1 circle, 2 square, 3 triangle) and ``classes.txt``, the
layout ``cnnlab.data.segmentation`` reads. ``task="detect"`` writes ``images/`` and a COCO
``annotations.json`` whose boxes are the tight box of each whole shape.

Image ``i`` depends only on ``(seed, i)``, so the same seed gives the same files and a larger
``n`` only adds images. The folder written must be new or empty (``staged_folder``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.destinations import staged_folder
from cnnlab.errors import CnnlabError

SHAPE_CLASSES = ("circle", "square", "triangle")  # class index = position + 1; 0 is background
TASKS = ("segment", "detect")

_MIN_VISIBLE = 0.6  # an occluded shape keeps at least this fraction of its pixels
_MIN_CONTRAST = 90.0  # Euclidean RGB distance between a shape and every background colour
_PLACEMENT_TRIES = 40


@dataclass
class Shape:
    """One drawn object: its class (1-based), the full shape's pixels and its fill colour."""

    label: int
    mask: np.ndarray  # (H, W) bool, the whole shape before anything covers it
    colour: np.ndarray  # (3,) float RGB


def write_shapes(
    dst: str | Path, task: str = "segment", n: int = 400, size: int = 128, seed: int = 0
) -> dict:
    """Write ``n`` synthetic ``size`` x ``size`` images for ``task`` ("segment" or "detect")
    into ``dst``; returns a summary with the folder, the classes and object counts."""
    if task not in TASKS:
        raise CnnlabError(f"unknown shapes task {task!r}; choose one of {', '.join(TASKS)}")
    if n < 1:
        raise CnnlabError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise CnnlabError(f"--size must be at least 32, got {size}")
    dst = Path(dst)
    # A new or empty folder only, filled beside it and renamed into place: a user's own
    # images/, masks/ or annotations are never replaced, and an interrupted write leaves
    # nothing behind.
    with staged_folder(dst) as staging:
        counts = _write_scenes(staging, task, n, size, seed)
    return {"dir": str(dst), "task": task, "n": n, "size": size, "seed": seed, "objects": counts}


def _write_scenes(dst: Path, task: str, n: int, size: int, seed: int) -> dict[str, int]:
    (dst / "images").mkdir()
    if task == "segment":
        (dst / "masks").mkdir()
    width = len(str(n - 1))
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    counts = dict.fromkeys(SHAPE_CLASSES, 0)
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        image, shapes, label_map = draw_scene(rng, size)
        name = f"{index:0{width}d}.png"
        Image.fromarray(image).save(dst / "images" / name)
        for shape in shapes:
            counts[SHAPE_CLASSES[shape.label - 1]] += 1
        if task == "segment":
            Image.fromarray(label_map).save(dst / "masks" / name)
        else:
            _add_coco_image(coco, index, name, size, shapes)
    if task == "segment":
        (dst / "classes.txt").write_text("\n".join(("background", *SHAPE_CLASSES)) + "\n")
    else:
        coco["categories"] = [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPE_CLASSES)
        ]
        (dst / "annotations.json").write_text(json.dumps(coco))
    return counts


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Shape], np.ndarray]:
    """One image: (uint8 (H, W, 3) RGB, the placed shapes in drawing order, uint8 (H, W)
    class-index map of what is visible)."""
    background, palette = _background(rng, size)
    shapes = _place_shapes(rng, size, palette)
    image = background
    label_map = np.zeros((size, size), np.uint8)
    for shape in shapes:  # later shapes cover earlier ones
        shading = rng.normal(0.0, 6.0, (size, size, 1))
        image = np.where(shape.mask[..., None], shape.colour + shading, image)
        label_map[shape.mask] = shape.label
    image = image + rng.normal(0.0, 4.0, image.shape)  # sensor noise over everything
    return np.clip(image, 0, 255).astype(np.uint8), shapes, label_map


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A noise, gradient or stripe texture (H, W, 3) float and the colours it is made of."""
    first, second = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy  # (H, W) position along a random direction
    kind = rng.integers(3)
    if kind == 0:  # noise around one colour
        texture = first + rng.normal(0.0, 18.0, (size, size, 3))
        return texture, [first]
    if kind == 1:  # linear gradient between two colours
        t = (along - along.min()) / (along.max() - along.min())
        return first + t[..., None] * (second - first), [first, (first + second) / 2, second]
    period = rng.uniform(0.06, 0.2)
    stripes = (np.sin(2 * np.pi * along / period) > 0)[..., None]
    return np.where(stripes, first, second), [first, second]


def _shape_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    # A shape must stand out from every background colour, or its mask is unlearnable.
    best, best_distance = None, -1.0
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        distance = min(float(np.linalg.norm(colour - other)) for other in avoid)
        if distance >= _MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _rasterise(label: int, cx: float, cy: float, radius: float, angle: float, size: int):
    """The (H, W) bool pixels whose centres lie inside the shape."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if label == 1:  # circle of the given radius
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    if label == 2:  # axis-aligned square with half-side 0.85 radius (area close to the circle's)
        half = 0.85 * radius
        return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
    corners = [
        (cx + radius * np.cos(angle + turn), cy + radius * np.sin(angle + turn))
        for turn in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)
    ]
    sides = [
        (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True)
    ]
    # inside: on the same side of all three edges, whichever way round the corners go
    return np.all([s >= 0 for s in sides], axis=0) | np.all([s <= 0 for s in sides], axis=0)


def _place_shapes(rng: np.random.Generator, size: int, palette: list[np.ndarray]) -> list[Shape]:
    """1 to 4 shapes, each wholly inside the image, overlapping only partly."""
    shapes: list[Shape] = []
    owner = np.full((size, size), -1)  # which shape is visible at each pixel
    for _ in range(rng.integers(1, 5)):
        for _ in range(_PLACEMENT_TRIES):
            label = int(rng.integers(1, 4))
            radius = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            mask = _rasterise(label, cx, cy, radius, rng.uniform(0, 2 * np.pi), size)
            if _keeps_others_visible(mask, owner, shapes):
                owner[mask] = len(shapes)
                colour = _shape_colour(rng, palette + [s.colour for s in shapes])
                shapes.append(Shape(label, mask, colour))
                break
    return shapes


def _keeps_others_visible(mask: np.ndarray, owner: np.ndarray, shapes: list[Shape]) -> bool:
    for index, shape in enumerate(shapes):
        still_visible = np.count_nonzero((owner == index) & ~mask)
        if still_visible < _MIN_VISIBLE * np.count_nonzero(shape.mask):
            return False
    return True


def tight_box(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` in pixel edges: pixel (r, c) covers [c, c + 1) x [r, r + 1)."""
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return [x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0]


def _add_coco_image(coco: dict, index: int, name: str, size: int, shapes: list[Shape]) -> None:
    image_id = index + 1  # COCO ids start at 1
    coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
    for shape in shapes:
        coco["annotations"].append(
            {
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": shape.label,
                "bbox": tight_box(shape.mask),
                "area": int(np.count_nonzero(shape.mask)),  # the whole shape, like the box
                "iscrowd": 0,
            }
        )
