"""Parts the R-CNN family shares: torchvision's labels with a background class, RoIPool and
the fc6/fc7 head, and ``ProposalRCNN``, the model of SPPNet and Fast R-CNN (the backbone
once per image, each given proposal pooled from its map), with its builder."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou, clip_boxes_to_image, roi_pool

from cnnlab.models.detection.contract import (
    EVAL_LIMITS,
    BoxScores,
    Detections,
    DetectLimits,
    Detector,
)
from cnnlab.models.features import backbone as backbone_features

# What a bare forward pass in eval mode keeps (torchvision's score threshold 0.05);
# ``detect`` sets the limits it is given.
FORWARD_LIMITS = EVAL_LIMITS.with_score(0.05)
# Proposals computed outside the model cannot be computed inside an exported graph.
PROPOSALS_REFUSAL = (
    "classifies selective-search proposals, which an exported graph cannot compute; export"
    " a detector that finds its own boxes (fasterrcnn, yolov1)"
)


def with_background_label(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Targets with torchvision's labels: 0 is its background class, so users' shift by 1."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def without_background_label(found: Detections) -> Detections:
    """torchvision's detections with the users' 0-based labels."""
    return [{**d, "labels": d["labels"] - 1} for d in found]


def set_detection_limits(roi_heads: RoIHeads, limits: DetectLimits) -> None:
    """What ``RoIHeads`` keeps at test time: scores above, NMS at, boxes per image."""
    roi_heads.score_thresh = limits.score_threshold
    roi_heads.nms_thresh = limits.nms_threshold
    roi_heads.detections_per_img = limits.max_detections


def proposal_settings(mode: str, max_boxes: int, file: str | None) -> dict:
    """A proposal-based model's ``proposal_settings``: where a task gets its proposals
    (``cnnlab.tasks.detect.proposal_source_of`` reads them)."""
    return {"mode": mode, "max_boxes": max_boxes, "file": file}


def roi_outputs(detector: Detector, images: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """(class logits (N * M, classes + 1), box regression (N * M, (classes + 1) * 4)) of
    the box head on the same M boxes ``rois`` of each of the N ``images``."""
    features = detector.feature_maps(images)
    size = tuple(images.shape[-2:])
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(features, [rois] * len(images), [size] * len(images))
    return heads.box_predictor(heads.box_head(pooled))


class RoIScores(BoxScores):
    """Each of K detections' score (N, K) for inputs (N, C, H, W): the box head's softmax
    probability of the detection's class on the proposal that made it (``rois`` (K, 4)),
    the proposals held fixed (as an R-CNN-family detector scores a box)."""

    def __init__(self, detector: Detector, rois: Tensor, labels: Tensor) -> None:
        super().__init__(detector, labels)
        self.rois = rois

    def on(self, detector: Detector) -> RoIScores:
        return RoIScores(detector, self.rois, self.labels)

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = roi_outputs(self.detector, x, self.rois)
        probs = logits.float().softmax(dim=-1).view(len(x), len(self.rois), -1)
        return probs[:, torch.arange(len(self.rois), device=probs.device), self.labels + 1]


def roi_scored_detections(
    detector: Detector, images: Tensor, limits: DetectLimits, proposals: list[Tensor] | None
) -> tuple[Detections, RoIScores]:
    """``Detector.scored_detections`` of a model whose ``roi_heads`` score proposals
    (Faster R-CNN, Fast R-CNN, SPPNet): its ``detect``, and the proposal that made each
    detection, found as the one whose box and score for the detection's class are the
    detection's (torchvision's postprocessing filters them, never changes them)."""
    captured: list[Tensor] = []
    hook = detector.roi_heads.register_forward_pre_hook(
        lambda _m, args: captured.append(args[1][0])  # (features, proposals, image_shapes)
    )
    try:
        found = detector.detect(images, limits, proposals)
    finally:
        hook.remove()
    rois = captured[0].detach()
    with torch.no_grad():
        logits, regression = roi_outputs(detector, images, rois)
        decoded = detector.roi_heads.box_coder.decode(regression, [rois])  # (M, classes + 1, 4)
        decoded = clip_boxes_to_image(decoded, tuple(images.shape[-2:]))
        probs = logits.float().softmax(dim=-1)
    boxes, scores, labels = found[0]["boxes"], found[0]["scores"], found[0]["labels"]
    gap = (decoded[:, labels + 1] - boxes[None]).abs().sum(dim=-1)  # (M, K)
    gap += (probs[:, labels + 1] - scores[None]).abs()
    sources = gap.argmin(dim=0)
    return found, RoIScores(detector, rois[sources], labels)


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


class ProposalRCNN(Detector):
    """Fast R-CNN or SPPNet: the backbone once per image, then each proposal's window
    pooled (``pooler``), fc6/fc7, a softmax classifier over the classes and background and
    a box regressor per class, trained jointly (torchvision's ``RoIHeads``: its sampling,
    box coder, multi-task loss with smooth L1, and per-class NMS at test time).

    Proposals are given, in the input's pixels: training reads them from each target's
    ``"proposals"``, ``detect`` takes them as an argument (without them the whole image is
    the one proposal). ``proposal_settings`` says where a task gets them
    (``cnnlab.data.proposals.ProposalSource``). Labels are 0-based user classes.
    """

    export_refusal = PROPOSALS_REFUSAL

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
            score_thresh=FORWARD_LIMITS.score_threshold,
            nms_thresh=FORWARD_LIMITS.nms_threshold,
            detections_per_img=FORWARD_LIMITS.max_detections,
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
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image in the input's pixels (model in eval mode)."""
        set_detection_limits(self.roi_heads, limits)
        return self(images, proposals=proposals)

    def feature_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The backbone's map of a batch, as the box head pools it."""
        return self.backbone(images)

    def scored_detections(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> tuple[Detections, BoxScores]:
        """``detect``'s detections and ``RoIScores``: each box's class probability on the
        proposal that made it."""
        return roi_scored_detections(self, images, limits, proposals)


def build_proposal_rcnn(
    num_classes: int,
    in_channels: int,
    backbone: str,
    backbone_weights: str | None,
    reduction: int,
    pooler: nn.Module,
    bins: int,
    representation_size: int,
    svd_rank: int | None,
    rois_per_image: int,
    foreground_fraction: float,
    background_iou_low: float,
    proposal_mode: str,
    max_proposals: int,
    proposal_file: str | None,
) -> ProposalRCNN:
    """A ``ProposalRCNN`` on the zoo ``backbone`` cut at ``reduction``, its proposals'
    windows pooled by ``pooler`` into ``bins`` cells per channel (SPPNet's pyramid, Fast
    R-CNN's 7 x 7 RoIPool)."""
    body, _ = backbone_features(backbone, [reduction], in_channels, backbone_weights)
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
