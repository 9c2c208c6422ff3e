"""Fast R-CNN (Girshick 2015, arXiv:1504.08083) on a cnnlab zoo backbone: the backbone runs
once per image, each region proposal (``cnnlab.data.proposals``) is RoI-pooled 7 x 7 from
its map, and the classifier and box regressor train jointly (``roi_heads.ProposalRCNN``)."""

from __future__ import annotations

from cnnlab.models.detection.roi_heads import ProposalRCNN, RoIPool, build_proposal_rcnn
from cnnlab.registry import register_model


@register_model(min_size=32, input_size=(3, 448, 448), task="detect", explain_layer="backbone")
def fastrcnn(
    num_classes: int = 20,
    in_channels: int = 3,
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    reduction: int = 16,
    representation_size: int = 1024,
    svd_rank: int | None = None,
    rois_per_image: int = 64,
    foreground_fraction: float = 0.25,
    background_iou_low: float = 0.1,
    proposal_mode: str = "fast",
    max_proposals: int = 2000,
    proposal_file: str | None = None,
) -> ProposalRCNN:
    """Fast R-CNN: selective-search proposals, RoIPool 7x7 on the shared feature map,
    fc6/fc7, softmax classifier and per-class box regressor trained jointly.

    As the paper: 64 RoIs sampled per image (train with ``--batch-size 2``), a quarter of
    them foreground (IoU >= 0.5 with an object), the rest background (IoU in
    [``background_iou_low``, 0.5)). ``svd_rank`` compresses fc6 and fc7 by truncated SVD at
    test time. Proposals come from ``cnnlab detect proposals``' cache (``proposal_mode``,
    ``max_proposals``) or from ``proposal_file`` (docs/proposals.md). ``num_classes`` counts
    object classes without background; ``reduction`` picks the backbone level.
    """
    return build_proposal_rcnn(
        num_classes, in_channels, backbone, backbone_weights, reduction,
        RoIPool(7, 1.0 / reduction), 7 * 7, representation_size, svd_rank, rois_per_image,
        foreground_fraction, background_iou_low, proposal_mode, max_proposals, proposal_file,
    )  # fmt: skip
