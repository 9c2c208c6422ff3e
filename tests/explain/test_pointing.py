"""The pointing game on planted evidence: a small pattern (a cross or a ring) at a random
place in textured clutter decides the class, the clutter holding parts of both patterns
(a T, an arc) and other bright shapes of the same size. After a short training, a map's
peak must fall inside the pattern's box on at least 90% of validation images, and a model
of the same architecture with random weights must score near chance on the same images:
a map that finds the pattern without the trained weights is finding bright shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.attribution.maps import attribute, class_scores, peak_of

SIDE, PATTERN = 26, 7
CLASSES = ("cross", "ring", "none")  # "none": clutter only, so no class is an absence


def shapes() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the patterns, cross and ring; the clutter: a block, a bar, a T and an arc)."""
    c = PATTERN // 2
    cross = torch.zeros(PATTERN, PATTERN, dtype=torch.bool)
    cross[c, :], cross[:, c] = True, True
    yy, xx = torch.meshgrid(torch.arange(PATTERN), torch.arange(PATTERN), indexing="ij")
    radius = torch.hypot((yy - c).float(), (xx - c).float())
    ring = (radius > c - 1.2) & (radius <= c + 0.3)
    block = torch.zeros_like(cross)
    block[1:5, 1:5] = True
    bar = torch.zeros_like(cross)
    bar[2:4, :] = True
    tee, arc = cross.clone(), ring.clone()
    tee[c + 1 :, c] = False
    arc[c + 1 :, c + 1 :] = False
    return [cross, ring], [block, bar, tee, arc]


def planted(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Normalised images (N, 1, S, S), labels, and each pattern's box (x0, y0, x1, y1)
    (None for "none")."""
    g = torch.Generator().manual_seed(seed)
    patterns, clutter = shapes()
    x = torch.rand((count, 1, SIDE, SIDE), generator=g) * 0.5  # the texture
    y = torch.arange(count) % len(CLASSES)
    boxes = []
    span = SIDE - PATTERN
    for i in range(count):
        top, left = torch.randint(0, span, (2,), generator=g).tolist()
        for shape in clutter:  # never on the pattern
            while True:
                a, b = torch.randint(0, span, (2,), generator=g).tolist()
                if abs(a - top) > PATTERN or abs(b - left) > PATTERN:
                    break
            x[i, 0, a : a + PATTERN, b : b + PATTERN][shape] = 1.0
        if y[i] < len(patterns):
            x[i, 0, top : top + PATTERN, left : left + PATTERN][patterns[int(y[i])]] = 1.0
            boxes.append((left, top, left + PATTERN, top + PATTERN))
        else:
            boxes.append(None)
    return (x - 0.3) / 0.25, y, boxes


def network() -> nn.Module:
    """Three 3x3 convolutions at full resolution (a field of 7 pixels, the pattern's size)
    and a global max pool: the class score is read at one place."""
    features = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
    )
    return nn.Sequential(features, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def pointing(model: nn.Module, x: torch.Tensor, boxes: list, method: str) -> float:
    """The share of images with a pattern whose map peaks inside its box (one pixel of
    slack: a bilinear map's peak may sit on the box's edge)."""
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    maps = attribute(model, x, class_scores(predicted), method, "0")
    hits = total = 0
    for heat, box in zip(maps, boxes, strict=True):
        if box is None:
            continue
        row, col = peak_of(heat)
        x0, y0, x1, y1 = box
        hits += x0 - 1 <= col <= x1 and y0 - 1 <= row <= y1
        total += 1
    return hits / total


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list]:
    torch.manual_seed(0)
    x, y, _ = planted(1024, seed=0)
    model = network()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(120):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    val_x, val_y, boxes = planted(60, seed=1)
    with torch.no_grad():
        accuracy = (model(val_x).argmax(dim=1) == val_y).float().mean()
    assert accuracy >= 0.9
    return model, val_x, val_y, boxes


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_the_map_points_at_the_planted_pattern(trained, method) -> None:
    model, x, _, boxes = trained
    assert pointing(model, x, boxes, method) >= 0.9
    torch.manual_seed(1)
    random = network().eval()
    # Chance: five shapes of the pattern's size in every image, so a map drawn to bright
    # shapes hits about one in five; a uniform point, the box's share of the image (~12%).
    assert pointing(random, x, boxes, method) <= 0.4
