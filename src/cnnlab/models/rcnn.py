"""The R-CNN family on a cnnlab zoo backbone: Faster R-CNN (Ren et al. 2015,
arXiv:1506.01497), and Fast R-CNN (Girshick 2015, arXiv:1504.08083) and SPPNet (He et al.
2014, arXiv:1406.4729), which classify given region proposals (``cnnlab.data.proposals``).

Assembled from torchvision's detection parts rather than rewritten: the zoo backbone is cut
at one level of its ``feature_info`` (stride 16 by default, the paper's VGG-16 conv5_3;
``cnnlab.models._features``),
then torchvision's ``AnchorGenerator`` + ``RegionProposalNetwork`` propose regions,
``MultiScaleRoIAlign`` (or the original ``RoIPool``) crops them and ``RoIHeads`` classifies
and refines them.

Conventions that differ from torchvision's ``FasterRCNN``:

* ``num_classes`` counts the user's classes only; the background class torchvision puts at
  label 0 is added inside. Labels in targets and detections are 0-based user classes.
* The model takes a batched tensor ``(B, C, H, W)`` (or torchvision's list of tensors) that
  cnnlab's data pipeline has already resized and normalised; torchvision's internal
  resize and normalisation are switched off, so boxes come back in the input's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_pool

from cnnlab.models._features import backbone as backbone_features
from cnnlab.registry import register_model

Detections = list[dict[str, Tensor]]  # per image: boxes (N, 4) xyxy, scores (N,), labels (N,)


def with_background_label(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Targets with torchvision's labels: 0 is its background class, so users' shift by 1."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def without_background_label(found: Detections) -> Detections:
    """torchvision's detections with the users' 0-based labels."""
    return [{**d, "labels": d["labels"] - 1} for d in found]


def set_detection_limits(
    roi_heads: RoIHeads, score_threshold: float, nms_threshold: float, max_detections: int
) -> None:
    """What ``RoIHeads`` keeps at test time: scores above, NMS at, boxes per image."""
    roi_heads.score_thresh = score_threshold
    roi_heads.nms_thresh = nms_threshold
    roi_heads.detections_per_img = max_detections


class _PreparedImages(GeneralizedRCNNTransform):
    # cnnlab's data pipeline resizes and normalises; doing it again here would resize boxes
    # twice and normalise twice. Batching (padding to a multiple of 32) still happens.
    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0])

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


class RoIPool(nn.Module):
    """The original Fast R-CNN RoIPool (max pooling over quantised bins) with the call
    signature of MultiScaleRoIAlign, so RoIHeads can use either."""

    def __init__(self, output_size: int, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list
    ) -> Tensor:
        return roi_pool(features["0"], proposals, self.output_size, self.spatial_scale)


class FasterRCNN(TorchvisionFasterRCNN):
    """torchvision's FasterRCNN with 0-based user labels and batched-tensor input."""

    def forward(
        self, images: Tensor | list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | Detections:
        """Training: the RPN and box-head losses, plus their sum under ``"loss"``. Eval:
        detections per image, labels 0-based."""
        if isinstance(images, Tensor):
            images = list(images.unbind(0))
        if targets is not None:
            targets = with_background_label(targets)
        output = super().forward(images, targets)
        if self.training:
            return {"loss": sum(output.values()), **output}
        return without_background_label(output)

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        score_threshold: float = 0.001,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> Detections:
        """Detections per image in the input's pixels (model in eval mode)."""
        set_detection_limits(self.roi_heads, score_threshold, nms_threshold, max_detections)
        return self(images)


def _fasterrcnn(
    num_classes: int,
    in_channels: int,
    backbone: str,
    backbone_weights: str | None,
    reduction: int,
    anchor_sizes: Sequence[int],
    aspect_ratios: Sequence[float],
    roi_pool: bool,
    representation_size: int,
    **kwargs: object,
) -> FasterRCNN:
    body, _ = backbone_features(backbone, [reduction], in_channels, backbone_weights)
    channels = body.out_channels
    # One feature map, so one tuple of sizes: every anchor size at every position.
    anchors = AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),))
    model = FasterRCNN(
        body,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        **kwargs,
    )
    if roi_pool:
        # FasterRCNN's constructor only takes MultiScaleRoIAlign; RoIHeads calls any pooler
        # with the same arguments, and both give 7x7 bins for the same box head.
        model.roi_heads.box_roi_pool = RoIPool(7, 1.0 / reduction)
    model.transform = _PreparedImages()
    model.min_input_size = max(32, body.min_input_size)
    return model


@register_model(min_size=32, input_size=(3, 448, 448), task="detect")
def fasterrcnn(
    num_classes: int = 20,
    in_channels: int = 3,
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    reduction: int = 16,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    roi_pool: bool = False,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 300,
    box_batch_size_per_image: int = 128,
    representation_size: int = 1024,
) -> FasterRCNN:
    """Faster R-CNN: RPN + RoIAlign (``roi_pool=True``: RoIPool) heads on a zoo backbone.

    ``num_classes`` counts object classes without background. ``reduction`` picks the
    backbone level (from its ``feature_info``); ``anchor_sizes`` are in input pixels and
    every size is paired with every aspect ratio (height / width). ``backbone_weights`` is
    a weight file (or ``"torchvision"``) for the zoo backbone. The proposal and sampling
    counts are the paper's: 2000 proposals while training, 300 at test, and 128 sampled
    RoIs per training image (py-faster-rcnn's TRAIN.BATCH_SIZE; torchvision uses 512).
    ``representation_size`` is the width of the two fully connected layers of the box head
    (torchvision's 1024; VGG-16's fc6/fc7 in the paper are 4096).
    """
    return _fasterrcnn(
        num_classes,
        in_channels,
        backbone,
        backbone_weights,
        reduction,
        anchor_sizes,
        aspect_ratios,
        roi_pool,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        box_batch_size_per_image=box_batch_size_per_image,
        representation_size=representation_size,
    )


# -- Fast R-CNN and SPPNet: the backbone once per image, each proposal pooled from its map


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


class FCHead(nn.Module):
    """fc6 and fc7 with ReLUs (torchvision's TwoMLPHead); with ``svd_rank``, in eval mode
    each layer runs as the two thin layers of its truncated SVD (Fast R-CNN section 3.1),
    factored from the current weights, which stay as they are in the state_dict."""

    def __init__(self, in_features: int, width: int, svd_rank: int | None = None) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, width)
        self.fc7 = nn.Linear(width, width)
        self.svd_rank = svd_rank
        self._factors: dict[str, tuple] = {}

    def _layer(self, name: str, x: Tensor) -> Tensor:
        layer = getattr(self, name)
        if self.training or not self.svd_rank or self.svd_rank > min(layer.weight.shape):
            return layer(x)
        weight = layer.weight  # the factors follow the rank and the weights' updates
        key = (self.svd_rank, weight.data_ptr(), weight._version, weight.device)
        cached = self._factors.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                u, s, vh = torch.linalg.svd(layer.weight.float(), full_matrices=False)
                k = self.svd_rank
                cached = (key, vh[:k].to(layer.weight.dtype), (u[:, :k] * s[:k]).to(x.dtype))
            self._factors[name] = cached
        _, first, second = cached
        return nn.functional.linear(nn.functional.linear(x, first), second, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self._layer("fc6", x.flatten(start_dim=1)))
        return torch.relu(self._layer("fc7", x))


class ProposalRCNN(nn.Module):
    """Fast R-CNN or SPPNet: the backbone once per image, then each proposal's window
    pooled (``pooler``), fc6/fc7, a softmax classifier over the classes and background and
    a box regressor per class, trained jointly (torchvision's ``RoIHeads``: its sampling,
    box coder, multi-task loss with smooth L1, and per-class NMS at test time).

    Proposals are given, in the input's pixels: training reads them from each target's
    ``"proposals"``, ``detect`` takes them as an argument (without them the whole image is
    the one proposal). ``proposal_settings`` says where a task gets them
    (``cnnlab.data.proposals.ProposalSource``). Labels are 0-based user classes.
    """

    def __init__(
        self,
        body: nn.Module,
        pooler: nn.Module,
        head: FCHead,
        num_classes: int,
        rois_per_image: int,
        foreground_fraction: float,
        background_iou_low: float,
        proposal_settings: dict,
    ) -> None:
        super().__init__()
        self.backbone = body
        self.roi_heads = RoIHeads(
            pooler,
            head,
            FastRCNNPredictor(head.fc7.out_features, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=rois_per_image,
            positive_fraction=foreground_fraction,
            bbox_reg_weights=None,  # (10, 10, 5, 5), as Fast R-CNN's normalised targets
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
        )
        self.background_iou_low = background_iou_low
        self.proposal_settings = proposal_settings
        self.min_input_size = max(32, body.min_input_size)

    def _background_from(self, proposals: Tensor, boxes: Tensor) -> Tensor:
        """The proposals a training image samples from: the paper's background is IoU in
        [0.1, 0.5) with every object, so the ones overlapping nothing go."""
        if not len(boxes) or not len(proposals) or self.background_iou_low <= 0:
            return proposals
        best = box_iou(proposals, boxes).max(dim=1).values
        return proposals[best >= self.background_iou_low]

    def forward(
        self,
        images: Tensor | list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> dict[str, Tensor] | Detections:
        """Training: the classifier and box losses, and their sum under ``"loss"``. Eval:
        detections per image in the input's pixels, labels 0-based."""
        if isinstance(images, list):
            images = torch.stack(images)
        size = tuple(images.shape[-2:])
        if self.training:
            if targets is None:
                raise ValueError("training needs targets with boxes, labels and proposals")
            proposals = [self._background_from(t["proposals"].float(), t["boxes"]) for t in targets]
            targets = with_background_label(targets)
        elif proposals is None:
            whole = torch.tensor([[0.0, 0.0, size[1], size[0]]], device=images.device)
            proposals = [whole] * len(images)
        features = self.backbone(images)
        proposals = [p.to(images.device, torch.float32) for p in proposals]
        found, losses = self.roi_heads(features, proposals, [size] * len(images), targets)
        if self.training:
            return {"loss": sum(losses.values()), **losses}
        return without_background_label(found)

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        score_threshold: float = 0.001,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image in the input's pixels (model in eval mode)."""
        set_detection_limits(self.roi_heads, score_threshold, nms_threshold, max_detections)
        return self(images, proposals=proposals)


def proposal_settings(mode: str, max_boxes: int, file: str | None) -> dict:
    """A proposal-based model's ``proposal_settings``: where a task gets its proposals
    (``cnnlab.tasks.detect.proposal_source_of`` reads them)."""
    return {"mode": mode, "max_boxes": max_boxes, "file": file}


def _proposal_rcnn(
    num_classes: int,
    in_channels: int,
    backbone: str,
    backbone_weights: str | None,
    reduction: int,
    levels: Sequence[int] | None,
    representation_size: int,
    svd_rank: int | None,
    rois_per_image: int,
    foreground_fraction: float,
    background_iou_low: float,
    proposal_mode: str,
    max_proposals: int,
    proposal_file: str | None,
) -> ProposalRCNN:
    body, _ = backbone_features(backbone, [reduction], in_channels, backbone_weights)
    if levels is None:  # Fast R-CNN: RoIPool 7 x 7
        pooler, bins = RoIPool(7, 1.0 / reduction), 49
    else:
        pooler = SpatialPyramidPool(levels, 1.0 / reduction)
        bins = pooler.bins
    head = FCHead(body.out_channels * bins, representation_size, svd_rank)
    settings = proposal_settings(proposal_mode, max_proposals, proposal_file)
    return ProposalRCNN(
        body,
        pooler,
        head,
        num_classes,
        rois_per_image,
        foreground_fraction,
        background_iou_low,
        settings,
    )


@register_model(min_size=32, input_size=(3, 448, 448), task="detect")
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
    return _proposal_rcnn(
        num_classes, in_channels, backbone, backbone_weights, reduction, None,
        representation_size, svd_rank, rois_per_image, foreground_fraction,
        background_iou_low, proposal_mode, max_proposals, proposal_file,
    )  # fmt: skip


@register_model(min_size=32, input_size=(3, 448, 448), task="detect")
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
    return _proposal_rcnn(
        num_classes, in_channels, backbone, backbone_weights, reduction, tuple(levels),
        representation_size, svd_rank, rois_per_image, foreground_fraction,
        background_iou_low, proposal_mode, max_proposals, proposal_file,
    )  # fmt: skip
