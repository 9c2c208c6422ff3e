"""Drawing predictions onto images: boxes, masks and labels, uint8 (C, H, W) in and out.

A mask is drawn as class-coloured outlines on the image beside a class map in solid
colours, never tinted over the image, whose own colours would mix with the classes'.

These are the pictures a prediction is saved as, and the tiles of a run's batch and
validation grids; the figures of a run folder (curves, confusion matrix, heat maps) are
matplotlib's, in ``cnnlab.plots``. One palette (matplotlib's tab10) colours a class's boxes,
its mask and its legend entry, here and on the web page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.uint8,
)
MAX_BOXES_DRAWN = 30  # more boxes than this hide the image; the highest scores are drawn
BOX_AREA = 64 * 64  # and at most one box per this many pixels of the drawing
LEGIBLE_SIDE = 256  # smaller images are enlarged (whole factors, nearest) to draw on them
CAPTION_MIN_SIDE = 64  # smaller images are enlarged under their caption
SIDE_BY_SIDE_GAP = 6  # white pixels between an image and its class map


def box_colour(label: int) -> tuple[int, int, int]:
    """The colour of class ``label``'s boxes."""
    return tuple(int(v) for v in PALETTE[label % len(PALETTE)])


def mask_colour(label: int) -> tuple[int, int, int]:
    """The colour of class ``label`` in a mask; the background (class 0) stays black."""
    if label == 0:
        return (0, 0, 0)
    return tuple(int(v) for v in PALETTE[(label - 1) % len(PALETTE)])


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): grey repeated, alpha dropped."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def unnormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (C, H, W) of an image normalised with ``mean`` and ``std`` (as a model sees it)."""
    image = image.detach().float().cpu()
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((image * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a uint8 (C, H, W) image (C 1 or 3)."""
    pixels = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def mask_png(mask: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W) mask of class indices as a palette image: each pixel's value
    is still its class (what ``cnnlab segment`` reads back), and any viewer shows the
    classes in their colours instead of near-black greys 0, 1, 2."""
    classes = mask.numpy().astype(np.uint8)
    picture = Image.fromarray(classes, mode="P")
    colours = [mask_colour(label) for label in range(256)]
    picture.putpalette([channel for colour in colours for channel in colour])
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def legible(image: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the image enlarged by a whole factor so its shorter side is at least 256 pixels,
    nearest neighbour, and that factor): labels drawn on a 64x64 image would cover it."""
    side = min(image.shape[-2:])
    factor = min(8, -(-LEGIBLE_SIDE // side)) if side < LEGIBLE_SIDE else 1
    if factor == 1:
        return image, 1
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1), factor


def class_map(mask: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): every pixel of a (H, W) mask of class indices in its class's solid
    colour (``mask_colour``: the background black), never mixed with the image."""
    labels = mask.numpy().astype(np.int64)
    colours = np.array([mask_colour(k) for k in range(labels.max() + 1)], dtype=np.uint8)
    return torch.from_numpy(colours[labels]).permute(2, 0, 1).contiguous()


def outline_classes(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): the image untouched but for each class's region (mask > 0) outlined
    in its colour, the line edged in black on both sides so it shows on any pixel. A tint
    would mix the class colour with the image's own (blue over a green circle reads as a
    third colour); an outline keeps both true."""
    labels = mask.long()
    side = min(labels.shape)
    width = max(1, round(side / 128))  # 2 pixels on the 256-pixel drawings ``legible`` makes
    pixels = rgb(image).permute(1, 2, 0).numpy().copy()
    edges = np.zeros(labels.shape, dtype=bool)
    rings: list[tuple[np.ndarray, tuple[int, int, int]]] = []
    for label in sorted(set(labels.unique().tolist()) - {0}):
        region = (labels == label).float()[None, None]
        inner = _erode(region, width)
        ring = (region - inner)[0, 0].numpy() > 0
        outside = (_dilate(region, 1) - region)[0, 0].numpy() > 0
        inside = (inner - _erode(region, width + 1))[0, 0].numpy() > 0
        edges |= outside | inside
        rings.append((ring, mask_colour(label)))
    pixels[edges] = 0
    for ring, colour in rings:  # over every edge, so a line between two classes stays whole
        pixels[ring] = colour
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _dilate(region: torch.Tensor, radius: int) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(region, 2 * radius + 1, stride=1, padding=radius)


def _erode(region: torch.Tensor, radius: int) -> torch.Tensor:
    return 1 - _dilate(1 - region, radius)


def draw_mask(
    image: torch.Tensor, mask: torch.Tensor, classes: Sequence[str] | None = None
) -> torch.Tensor:
    """uint8 (3, H', W'): the image with each class outlined in its colour beside the class
    map in solid colours (``outline_classes`` | ``class_map``), an image under 256 pixels
    first enlarged (``legible``); with ``classes``, a legend band below names the colours
    of the classes present."""
    image, factor = legible(image)
    mask = mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    left, right = outline_classes(image, mask), class_map(mask)
    height, width = left.shape[-2:]
    pair = torch.full((3, height, 2 * width + SIDE_BY_SIDE_GAP), 255, dtype=torch.uint8)
    pair[:, :, :width] = left
    pair[:, :, width + SIDE_BY_SIDE_GAP :] = right
    if classes is None:
        return pair
    present = sorted(set(mask.unique().tolist()) - {0})
    return legend_below(pair, [(classes[k], mask_colour(k)) for k in present])


def legend_font_size(height: int) -> int:
    """The pixel size of a legend's text under a picture ``height`` pixels high."""
    return max(12, min(48, round(height / 30)))


def legend_below(image: torch.Tensor, entries: list[tuple[str, tuple[int, int, int]]]):
    """uint8 (3, H + band, W): ``image`` above a white band of colour swatches and names,
    wrapped over as many lines as the width needs (W grows only for a name wider than the
    image)."""
    width = image.shape[-1]
    # The text grows with the picture (12 pixels up to 360 rows, at most 48), so a legend
    # under a large photo is not a line of specks once the picture is shown whole.
    size = legend_font_size(image.shape[-2])
    font = _font(size)
    line_height, swatch = round(size * 4 / 3), round(size * 5 / 6)
    lines: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = widest = 4
    for name, colour in entries or [("background only", (255, 255, 255))]:
        needed = swatch + size // 3 + int(font.getlength(name)) + size
        if x + needed > width and lines[-1]:
            lines.append([])
            x = 4
        lines[-1].append((name, colour, x))
        x += needed
        widest = max(widest, x)
    # a name wider than the picture widens the band (the picture stays at the left): a
    # label is never cut
    canvas_width = max(width, widest)
    canvas = Image.new(
        "RGB", (canvas_width, image.shape[-2] + line_height * len(lines) + 4), "white"
    )
    canvas.paste(Image.fromarray(rgb(image).permute(1, 2, 0).numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        y = image.shape[-2] + 4 + row * line_height
        for name, colour, x in line:
            top = y + (line_height - swatch) // 2
            draw.rectangle([x, top, x + swatch, top + swatch], fill=colour, outline="black")
            draw.text((x + swatch + size // 3, y), name, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def draw_boxes(
    image: torch.Tensor,
    detections: list[dict],
    classes: list[str],
    max_boxes: int = MAX_BOXES_DRAWN,
) -> torch.Tensor:
    """uint8 (3, H, W): each detection's ``box`` in its class colour with a dark edge (so it
    shows on any background), its "class score" on a filled tag above the box (inside it
    at the top edge, and never past the right edge). An image under 256 pixels is first
    enlarged (``legible``). At most ``max_boxes``, and one per 64x64 pixels of the drawing,
    the highest scores; a note in the corner says how many more there are."""
    image, factor = legible(image)
    canvas = Image.fromarray(rgb(image).permute(1, 2, 0).numpy().copy())
    height, width = canvas.height, canvas.width
    draw = ImageDraw.Draw(canvas)
    font = _font(tag_font_size(height, width))
    line = max(1, round(min(height, width) / 160))
    ranked = sorted(detections, key=lambda d: -d.get("score", 1.0))
    cap = max(1, min(max_boxes, height * width // BOX_AREA))
    shown, hidden = ranked[:cap], len(ranked) - cap
    # Tags are placed best first, each moved clear of those placed before it (two boxes on
    # one object would otherwise print their labels over each other); boxes, then tags, are
    # drawn lowest score first, so the best end up on top and no box crosses a label.
    placed: list[tuple[float, float, float, float]] = []
    tags = []
    for detection in shown:
        score = detection.get("score")
        text = f"{detection['class']} {score:.2f}" if score is not None else detection["class"]
        x0, y0 = (float(v) * factor for v in detection["box"][:2])
        spot = tag_spot(draw, font, text, x0, y0, width, height, placed)
        placed.append(spot)
        tags.append((text, spot))
    colours = [box_colour(classes.index(d["class"])) for d in shown]
    for detection, colour in zip(reversed(shown), reversed(colours), strict=True):
        x0, y0, x1, y1 = (float(v) * factor for v in detection["box"])
        draw.rectangle([x0 - line, y0 - line, x1 + line, y1 + line], outline="black", width=1)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line + 1)
    for (text, spot), colour in zip(reversed(tags), reversed(colours), strict=True):
        _tag(draw, font, text, colour, spot[0], spot[1], width, placed_at=spot)  # over boxes
    if hidden > 0:
        # Labelled boxes (the ground truth) have no score to rank by: only their count.
        lowest = shown[-1].get("score")
        note = f"+{hidden} more" + (f" below score {lowest:.2f}" if lowest is not None else "")
        _tag(draw, font, note, (255, 255, 255), width, height, width, anchor_bottom=True)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def tag_font_size(height: int, width: int) -> int:
    """The pixel size of a box's tag on a drawing of ``height`` x ``width`` (after
    ``legible``): 10 at least, 18 at most."""
    return max(10, min(18, round(min(height, width) / 22)))


def tag_spot(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont,
    text: str,
    x: float,
    y: float,
    width: int,
    height: int,
    taken: list[tuple[float, float, float, float]],
) -> tuple[float, float, float, float]:
    """Where ``text``'s tag goes for a box whose top left is (x, y): above the box when it
    fits, else inside its top edge; inside ``width``; moved down past any of the ``taken``
    tags it would cover (x0, y0, x1, y1)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 4, bottom - top + 4
    x = min(max(0.0, x), max(0.0, width - tag_w))
    y = y - tag_h if y - tag_h >= 0 else y
    moved = True
    while moved:
        moved = False
        for x0, y0, x1, y1 in taken:
            if x < x1 and x0 < x + tag_w and y < y1 and y0 < y + tag_h:
                y, moved = y1, True
    y = min(y, max(0.0, height - tag_h))
    return (x, y, x + tag_w, y + tag_h)


def _tag(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont,
    text: str,
    colour: tuple[int, int, int],
    x: float,
    y: float,
    width: int,
    anchor_bottom: bool = False,
    placed_at: tuple[float, float, float, float] | None = None,
) -> None:
    """``text`` on a filled box of ``colour`` at (x, y): above y when it fits, else below it;
    shifted left to stay inside ``width`` (or exactly at ``placed_at``, from
    ``tag_spot``); black or white text, whichever reads better."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 4, bottom - top + 4
    if placed_at is None:
        x = min(max(0.0, x), max(0.0, width - tag_w))
        y = y - tag_h if anchor_bottom or y - tag_h >= 0 else y
    else:
        x, y = placed_at[:2]
    draw.rectangle([x, y, x + tag_w, y + tag_h], fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill="black" if luminance > 140 else "white",
              font=font)  # fmt: skip


def caption(image: torch.Tensor, text: str) -> torch.Tensor:
    """uint8 (3, H + band, W): the image below a white band holding ``text``. An image
    under ``CAPTION_MIN_SIDE`` is enlarged (nearest neighbour, by a whole factor), and the
    band is widened, the image centred under it, when the text is wider than the image: a
    label is never cut."""
    side = min(image.shape[-2:])
    if side < CAPTION_MIN_SIDE:
        factor = -(-CAPTION_MIN_SIDE // side)
        image = image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    pixels = rgb(image).permute(1, 2, 0).numpy()
    font = _font(14)
    band = 20
    left, _, right, _ = font.getbbox(text)
    width = max(pixels.shape[1], right - left + 6)
    canvas = Image.new("RGB", (width, pixels.shape[0] + band), "white")
    canvas.paste(Image.fromarray(pixels), ((width - pixels.shape[1]) // 2, band))
    ImageDraw.Draw(canvas).text((3 - left, 2), text, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at ``size`` pixels (no system font is needed)."""
    return ImageFont.load_default(size=size)
