"""Drawing predictions onto images: boxes, masks and labels, uint8 (C, H, W) in and out.

These are the pictures a prediction is saved as; the figures of a run folder (curves,
confusion matrix, heat maps) are matplotlib's, in ``cnnlab.plots``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

# Box and mask colours: a qualitative palette (tab10), cycled over the classes.
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
# Box colours (CSS names too, so a web page draws them alike), cycled over the classes.
BOX_COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]


def rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): grey repeated, alpha dropped."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def overlay_mask(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W): the image with every non-background class (mask > 0) tinted in its
    colour; ``mask`` is (H, W) class indices."""
    pixels = rgb(image).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    classes = mask.numpy().astype(np.int64)
    colours = PALETTE[(classes - 1) % len(PALETTE)].astype(np.float32)  # (H, W, 3)
    tinted = (1 - alpha) * pixels + alpha * colours
    out = np.where(classes[..., None] > 0, tinted, pixels).round().astype(np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def draw_boxes(image: torch.Tensor, detections: list[dict], classes: list[str]) -> torch.Tensor:
    """uint8 (3, H, W): each detection's ``box`` drawn with "class score" in its class colour."""
    from torchvision.utils import draw_bounding_boxes

    image = rgb(image)
    if not detections:
        return image.clone()
    return draw_bounding_boxes(
        image,
        torch.tensor([d["box"] for d in detections]),
        labels=[f"{d['class']} {d['score']:.2f}" for d in detections],
        colors=[BOX_COLOURS[classes.index(d["class"]) % len(BOX_COLOURS)] for d in detections],
        width=2,
    )


def caption(image: torch.Tensor, text: str) -> torch.Tensor:
    """uint8 (3, H + band, W): the image below a white band holding ``text``."""
    pixels = rgb(image).permute(1, 2, 0).numpy()
    band = 14
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + band), "white")
    canvas.paste(Image.fromarray(pixels), (0, band))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1).contiguous()
