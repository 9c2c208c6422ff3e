"""What the drawings show: labels whole and readable, the best box on top."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from cnnlab.draw import CAPTION_MIN_SIDE, box_colour, caption, draw_boxes, tag_spot


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
