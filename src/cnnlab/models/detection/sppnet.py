"""SPPNet (He et al. 2014, arXiv:1406.4729) on a cnnlab zoo backbone: the backbone runs once
per image and each region proposal's window on its feature map is max-pooled by a spatial
pyramid into a fixed-length vector for fc6/fc7 (``roi_heads.ProposalRCNN``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_pool

from cnnlab.models.detection.roi_heads import ProposalRCNN, build_proposal_rcnn
from cnnlab.registry import register_model


class SpatialPyramidPool(nn.Module):
    """SPPNet's pooling: each box's window on the feature map max-pooled into an l x l grid
    for every level l (the paper's 6, 3, 2, 1), flattened and concatenated; RoIPool's call
    signature, so RoIHeads can use it."""

    def __init__(self, levels: Sequence[int], spatial_scale: float) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.spatial_scale = spatial_scale

    @property
    def bins(self) -> int:
        return sum(level * level for level in self.levels)

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list
    ) -> Tensor:
        pooled = [
            roi_pool(features["0"], proposals, level, self.spatial_scale).flatten(1)
            for level in self.levels
        ]
        return torch.cat(pooled, dim=1)


@register_model(min_size=32, input_size=(3, 448, 448), task="detect", explain_layer="backbone")
def sppnet(
    num_classes: int = 20,
    in_channels: int = 3,
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    reduction: int = 16,
    levels: Sequence[int] = (6, 3, 2, 1),
    representation_size: int = 1024,
    svd_rank: int | None = None,
    rois_per_image: int = 64,
    foreground_fraction: float = 0.25,
    background_iou_low: float = 0.1,
    proposal_mode: str = "fast",
    max_proposals: int = 2000,
    proposal_file: str | None = None,
) -> ProposalRCNN:
    """SPPNet: as ``fastrcnn``, but each proposal's window is pooled by a spatial pyramid
    (an l x l max-pooled grid per level of ``levels``, the paper's 6, 3, 2, 1, concatenated)
    before fc6/fc7, the softmax classifier and the per-class box regressor."""
    pooler = SpatialPyramidPool(levels, 1.0 / reduction)
    return build_proposal_rcnn(
        num_classes, in_channels, backbone, backbone_weights, reduction, pooler, pooler.bins,
        representation_size, svd_rank, rois_per_image, foreground_fraction,
        background_iou_low, proposal_mode, max_proposals, proposal_file,
    )  # fmt: skip
