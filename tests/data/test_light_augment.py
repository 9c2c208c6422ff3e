"""The hand-written ``light`` preset (``LightAugment``) against torchvision's transforms.

Given the same parameters its output is what RandomResizedCrop.transform, a horizontal
flip, ToDtype, ColorJitter.transform and normalize_image give; its draws keep torchvision's
ranges and distributions; a seed repeats an image.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cnnlab.data.transforms import LightAugment, LightParams, default_stats

JITTER_INDEX = {"brightness": 0, "contrast": 1, "saturation": 2}  # ColorJitter's fn_idx


def torchvision_light(image: torch.Tensor, params: LightParams, size: int, channels: int):
    """The same steps through torchvision's own transform kernels."""
    mean, std = default_stats(channels)
    crop = v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))
    box = {"top": params.top, "left": params.left}
    out = crop.transform(image, {**box, "height": params.height, "width": params.width})
    if params.flip:
        out = F.horizontal_flip_image(out)
    out = F.to_dtype_image(out, torch.float32, scale=True)
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    order = [JITTER_INDEX[name] for name in params.order] + [3]  # 3: hue, off
    jitter_params = {
        "fn_idx": torch.tensor(order),
        "brightness_factor": params.brightness,
        "contrast_factor": params.contrast,
        "saturation_factor": params.saturation,
        "hue_factor": None,
    }
    return F.normalize_image(jitter.transform(out, jitter_params), list(mean), list(std))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("height", "width", "size"), [(16, 16, 16), (30, 23, 16), (9, 13, 16), (40, 64, 24)]
)
def test_same_parameters_give_torchvision_s_image(channels, height, width, size):
    mean, std = default_stats(channels)
    light = LightAugment(size, True, mean, std)
    torch.manual_seed(channels * 1000 + height)
    for _ in range(12):
        image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8)
        params = light.draw(height, width)
        out = light.apply(image, params)
        assert out.shape == (channels, size, size) and out.dtype == torch.float32
        assert out.is_contiguous()
        # 1e-6 of a [0, 1] pixel (a 4000th of a uint8 level) before normalisation.
        expected = torchvision_light(image, params, size, channels)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 / min(std))


def test_every_branch_matches_torchvision():
    # Factors above and below 1 (clamped or not), each order, flipped or not, with and
    # without a resize (a crop of exactly the output size), RGB from a channels-last
    # (decoded JPEG) layout.
    mean, std = default_stats(3)
    light = LightAugment(16, True, mean, std)
    image = torch.randint(0, 256, (20, 18, 3), dtype=torch.uint8).permute(2, 0, 1)
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
        for factor in (0.8, 1.2):
            for top, height in ((0, 16), (3, 17)):
                params = LightParams(
                    top=top,
                    left=1,
                    height=height,
                    width=16,
                    flip=factor > 1,
                    order=tuple(list(JITTER_INDEX)[i] for i in order),
                    brightness=factor,
                    contrast=2 - factor,
                    saturation=factor,
                )
                expected = torchvision_light(image, params, 16, 3)
                out = light.apply(image, params)
                torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 / min(std))


def test_draws_keep_torchvision_s_ranges():
    torch.manual_seed(0)
    height, width = 30, 40
    light = LightAugment(16, True, *default_stats(3))
    draws = [light.draw(height, width) for _ in range(3000)]
    for p in draws:
        assert 0 <= p.top <= height - p.height and 0 <= p.left <= width - p.width
        area = p.height * p.width / (height * width)
        ratio = p.width / p.height
        # w and h are rounded to whole pixels: the bounds hold up to half a pixel a side.
        slack = 0.5 / min(p.height, p.width)
        assert 0.7 * (1 - slack) ** 2 <= area <= 1.0 * (1 + slack) ** 2
        assert 5 / 6 * (1 - slack) <= ratio * (1 + slack) and ratio * (1 - slack) <= 6 / 5
        for factor in (p.brightness, p.contrast, p.saturation):
            assert 0.8 <= factor <= 1.2
    flips = sum(p.flip for p in draws) / len(draws)
    assert 0.46 < flips < 0.54
    orders = {p.order for p in draws}
    assert len(orders) == 6  # every order of the three steps
    brightness = torch.tensor([p.brightness for p in draws])
    assert abs(brightness.mean() - 1.0) < 0.01 and abs(brightness.std() - 0.4 / 12**0.5) < 0.01
    # The crop boxes follow RandomResizedCrop.make_params' distribution (its rejections of
    # boxes that do not fit included): the same means and spreads over as many draws.
    crop = v2.RandomResizedCrop(16, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))
    image = torch.zeros(3, height, width)
    theirs = [crop.make_params([image]) for _ in range(3000)]

    def stats(boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
        top, left, h, w = torch.tensor(boxes, dtype=torch.float64).T
        features = torch.stack([top, left, h * w / (height * width), (w / h).log()])
        return torch.stack([features.mean(1), features.std(1)])

    ours = stats([(p.top, p.left, p.height, p.width) for p in draws])
    expected = stats([(b["top"], b["left"], b["height"], b["width"]) for b in theirs])
    # About four standard errors of each mean; spreads within 10%.
    assert ((ours[0] - expected[0]).abs() <= 4 * expected[1] / 3000**0.5).all(), (ours, expected)
    assert ((ours[1] / expected[1] - 1).abs() < 0.1).all(), (ours, expected)


def test_a_tall_thin_image_falls_back_to_a_centre_crop():
    # 4 x 40: no crop of 70-100% of the area with a ratio near 1 fits in ten tries, so
    # torchvision takes the centre, as wide as allowed: width = height * 6/5.
    light = LightAugment(8, False, *default_stats(1))
    torch.manual_seed(0)
    params = {light.draw(4, 40) for _ in range(20)}
    assert {(p.top, p.left, p.height, p.width, p.flip) for p in params} == {(0, 17, 4, 5, False)}
    narrow = light.draw(40, 4)
    crop = v2.RandomResizedCrop(8, scale=(0.7, 1.0), ratio=(5 / 6, 6 / 5))
    centre = crop.make_params([torch.zeros(1, 40, 4)])  # torchvision's fallback box
    assert (narrow.top, narrow.left, narrow.height, narrow.width) == tuple(centre.values())
    image = torch.randint(0, 256, (1, 4, 40), dtype=torch.uint8)
    p = params.pop()
    expected = torchvision_light(image, p, 8, 1)
    torch.testing.assert_close(light.apply(image, p), expected, rtol=0, atol=2e-6)


def test_the_same_seed_gives_the_same_image():
    light = LightAugment(16, True, *default_stats(3))
    image = torch.randint(0, 256, (3, 21, 19), dtype=torch.uint8)
    torch.manual_seed(5)
    first = light(image)
    torch.manual_seed(5)
    assert torch.equal(light(image), first)
    assert not torch.equal(light(image), first)  # the generator moved on
