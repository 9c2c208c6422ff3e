"""What the drawings show: labels whole and readable, the best box on top."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from cnnlab.draw import (
    CAPTION_MIN_SIDE,
    PALETTE,
    SIDE_BY_SIDE_GAP,
    box_colour,
    caption,
    class_map,
    draw_boxes,
    draw_mask,
    legend_font_size,
    legible,
    mask_colour,
    outline_classes,
    tag_font_size,
    tag_spot,
)

LEGIBLE_TEXT = 10  # pixels: the smallest text size any drawing may use
CLASSES = ["background", "circle", "square", "triangle"]


def busy_image(height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W) of random saturated colours: a class colour blended over it would
    come out as a colour of neither."""
    generator = torch.Generator().manual_seed(height * 7919 + width)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def shapes_mask(height: int, width: int) -> torch.Tensor:
    """(H, W) classes: a circle (1) at the left, a square (2) at the right, touching the
    edge, a triangle's worth (3) along the bottom."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask = torch.zeros(height, width, dtype=torch.long)
    radius = min(height, width) / 4
    mask[(rows - height / 3) ** 2 + (cols - width / 4) ** 2 < radius**2] = 1
    mask[: height // 2, width * 2 // 3 :] = 2
    mask[rows > height * 5 // 6] = 3
    return mask


def test_a_caption_is_never_cut_on_a_small_image() -> None:
    image = torch.full((3, 25, 25), 128, dtype=torch.uint8)
    text = "not_a_digit 97%"
    drawn = caption(image, text)
    assert drawn.shape[-2] >= CAPTION_MIN_SIDE and drawn.shape[-1] >= CAPTION_MIN_SIDE
    # The band is wide enough for the whole text, with ink up to its last letter.
    font = ImageFont.load_default(size=14)  # the caption's
    left, _, right, _ = font.getbbox(text)
    assert drawn.shape[-1] >= right - left + 4
    band = drawn[:, :18].min(dim=0).values  # (rows, W): dark where there is text
    inked = (band < 128).any(dim=0).nonzero().flatten()
    assert inked.max() >= right - left - 4 and inked.max() < drawn.shape[-1] - 1


def test_tags_of_boxes_on_one_object_do_not_cover_each_other() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (256, 256)))
    font = ImageFont.load_default(size=12)
    first = tag_spot(draw, font, "circle 0.52", 40, 60, 256, 256, [])
    second = tag_spot(draw, font, "square 0.31", 40, 60, 256, 256, [first])
    x0, y0, x1, y1 = first
    assert not (second[0] < x1 and x0 < second[2] and second[1] < y1 and y0 < second[3])


def test_the_higher_score_is_drawn_over_the_lower() -> None:
    image = torch.zeros((3, 256, 256), dtype=torch.uint8)
    box = [40.0, 80.0, 200.0, 220.0]
    detections = [
        {"class": "square", "score": 0.31, "box": box},
        {"class": "circle", "score": 0.52, "box": box},
    ]
    drawn = draw_boxes(image, detections, ["circle", "square"])
    edge = drawn[:, 150, 40].tolist()  # a pixel on both boxes' left edge
    assert edge == list(box_colour(0))  # the circle's (0.52), not the square's


@pytest.mark.parametrize("side", [16, 96, 300])
def test_a_mask_is_drawn_in_pure_palette_colours_never_blended(side: int) -> None:
    image, mask = busy_image(side, side * 3 // 2), shapes_mask(side, side * 3 // 2)
    drawn = draw_mask(image, mask, CLASSES)
    big, factor = legible(image)
    big_mask = mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    height, width = big_mask.shape
    # the right panel: every pixel exactly its class's colour, the background black
    right = drawn[:, :height, width + SIDE_BY_SIDE_GAP : 2 * width + SIDE_BY_SIDE_GAP]
    assert torch.equal(right, class_map(big_mask))
    for label in range(4):
        assert (right.permute(1, 2, 0)[big_mask == label] == torch.tensor(mask_colour(label))).all()
    # the left panel: each pixel is the image's own, black (the outline's edge) or a pure
    # palette colour (the outline): nothing in between
    left = drawn[:, :height, :width].permute(1, 2, 0).reshape(-1, 3)
    own = big.permute(1, 2, 0).reshape(-1, 3)
    changed = (left != own).any(dim=1)
    allowed = {tuple(c) for c in PALETTE.tolist()} | {(0, 0, 0)}
    assert changed.any()
    assert {tuple(c) for c in left[changed].tolist()} <= allowed
    # most of each region is left as the image shows it: outlined, not tinted
    inside = (big_mask > 0).flatten()
    assert (~changed[inside]).float().mean() > 0.7
    # every class present has its outline in its own colour
    for label in (1, 2, 3):
        assert (left == torch.tensor(mask_colour(label))).all(dim=1).any()


def test_an_outline_follows_the_class_boundary() -> None:
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[16:48, 16:48] = 2
    drawn = outline_classes(image, mask).permute(1, 2, 0)
    assert drawn[16, 30].tolist() == list(mask_colour(2))  # on the square's edge
    assert drawn[15, 30].tolist() == [0, 0, 0]  # its dark edge, just outside
    assert drawn[32, 32].tolist() == [200, 200, 200]  # the inside untouched
    assert drawn[5, 5].tolist() == [200, 200, 200]  # the background untouched


def text_inked_columns(band: torch.Tensor) -> torch.Tensor:
    """The columns of a white band (3, h, W) holding dark text."""
    return (band.min(dim=0).values < 100).any(dim=0).nonzero().flatten()


@pytest.mark.parametrize(("height", "width"), [(16, 16), (32, 48), (427, 640)])
def test_every_label_lies_inside_its_drawing_and_is_legible(height: int, width: int) -> None:
    """Boxes at the corners and the edges (tags pushed inside), the legend of a mask and a
    caption, at the smallest and largest sizes drawn."""
    image = busy_image(height, width)
    shown, factor = legible(image)
    drawing_h, drawing_w = shown.shape[-2:]
    font_size = tag_font_size(drawing_h, drawing_w)
    assert font_size >= LEGIBLE_TEXT
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (drawing_w, drawing_h)))
    corners = [(0, 0), (drawing_w - 2, 0), (0, drawing_h - 2), (drawing_w - 2, drawing_h - 2)]
    placed: list[tuple[float, float, float, float]] = []
    for x, y in corners:
        spot = tag_spot(draw, font, "triangle 0.99", x, y, drawing_w, drawing_h, placed)
        placed.append(spot)
        assert min(spot[:2]) >= 0 and spot[2] <= drawing_w and spot[3] <= drawing_h
    boxes = [
        {"class": name, "score": 0.9 - 0.1 * i, "box": [x / factor, y / factor, width, height]}
        for i, (name, (x, y)) in enumerate(zip(CLASSES[1:] * 2, corners, strict=False))
    ]
    assert draw_boxes(image, boxes, CLASSES).shape[-2:] == (drawing_h, drawing_w)
    # a mask's legend: text of at least 10 pixels, every name inside the drawing
    mask = shapes_mask(height, width)
    drawn = draw_mask(image, mask, ["background", "a rather long class name", "b", "c"])
    assert legend_font_size(drawing_h) >= LEGIBLE_TEXT
    band = drawn[:, drawing_h:]
    inked = text_inked_columns(band)
    assert inked.numel() and inked.max() < drawn.shape[-1] - 2
    # a caption: the whole text inside
    captioned = caption(image, "a rather long class name 97%")
    assert min(captioned.shape[-2] - 20, captioned.shape[-1]) >= CAPTION_MIN_SIDE  # 20: band
    assert text_inked_columns(captioned[:, :18]).max() < captioned.shape[-1] - 1
