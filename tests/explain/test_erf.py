"""The measured effective receptive field against an independent computation: for a stack
of convolutions whose kernels are all ones, without non-linearities, the centre unit's input
gradient is the kernels' repeated convolution (numpy), whatever the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.inspect.erf import effective_fields


def box_stack(kernels: list[int], strides: list[int]) -> nn.Module:
    layers = []
    for k, s in zip(kernels, strides, strict=True):
        conv = nn.Conv2d(1, 1, k, stride=s, padding=k // 2, bias=False)
        nn.init.ones_(conv.weight)
        layers.append(conv)
    return nn.Sequential(*layers)


def independent_radius(profile: np.ndarray, mass: float = 0.95) -> int:
    """Half-side of the centred square holding ``mass`` of outer(profile, profile)."""
    grid = np.outer(profile, profile)
    centre = len(profile) // 2
    for radius in range(centre + 1):
        inside = grid[centre - radius : centre + radius + 1, centre - radius : centre + radius + 1]
        if inside.sum() >= mass * grid.sum() - 1e-9:
            return radius
    return centre


@pytest.mark.parametrize("kernels", [[3, 3, 3], [5, 3], [3, 3, 3, 3, 3]])
def test_erf_of_a_box_stack_matches_numpy(kernels: list[int]) -> None:
    model = box_stack(kernels, [1] * len(kernels))
    (field,) = effective_fields(model, (1, 41, 41))
    profile = np.ones(1)
    for k in kernels:
        profile = np.convolve(profile, np.ones(k))
    assert field.theoretical == len(profile)
    assert abs(field.radius - independent_radius(profile)) <= 1


def test_each_stride_is_a_stage_and_the_erf_is_inside_the_field() -> None:
    model = box_stack([3, 3, 3], [1, 2, 1])
    torch.manual_seed(0)
    fields = effective_fields(model, (1, 33, 33))
    assert [f.stride for f in fields] == [1, 2]
    for field in fields:
        assert field.effective <= field.theoretical + 1
