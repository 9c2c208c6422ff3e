"""Test-time augmentation for classifiers (``cnnlab eval/predict --tta``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TTA(nn.Module):
    """Test-time augmentation: the class probabilities of each image averaged over its
    views (itself, its mirror image, its centre ``zoom`` part enlarged back), all in one
    forward pass. Returns their logarithm, so whatever takes logits (softmax, the
    cross-entropy of evaluation) reads the averaged probabilities."""

    def __init__(self, model: nn.Module, mirror: bool, zoom: float | None) -> None:
        super().__init__()
        self.model, self.mirror, self.zoom = model, mirror, zoom

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) normalised
        views = [x]
        if self.mirror:
            views.append(x.flip(-1))
        if self.zoom is not None:
            height, width = x.shape[-2:]
            crop_h, crop_w = round(height * self.zoom), round(width * self.zoom)
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            part = x[..., top : top + crop_h, left : left + crop_w]
            views.append(F.interpolate(part, size=(height, width), mode="bilinear"))
        probs = self.model(torch.cat(views)).float().softmax(dim=1)  # (V * B, K)
        return probs.view(len(views), len(x), -1).mean(dim=0).clamp_min(1e-12).log()
