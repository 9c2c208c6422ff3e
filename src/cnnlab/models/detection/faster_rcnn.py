"""Faster R-CNN (Ren et al. 2015, arXiv:1506.01497) on a cnnlab zoo backbone, assembled
from torchvision's detection parts: the backbone cut at one ``feature_info`` level (stride
16 by default, the paper's VGG-16 conv5_3), an RPN, RoIAlign (or RoIPool) and RoIHeads.

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
from torch import Tensor
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from cnnlab.models.detection.contract import (
    EVAL_LIMITS,
    BoxScores,
    Detections,
    DetectLimits,
    Detector,
)
from cnnlab.models.detection.roi_heads import (
    RoIPool,
    roi_scored_detections,
    set_detection_limits,
    with_background_label,
    without_background_label,
)
from cnnlab.models.features import backbone as backbone_features
from cnnlab.registry import register_model


class _PreparedImages(GeneralizedRCNNTransform):
    # cnnlab's data pipeline resizes and normalises; doing it again here would resize boxes
    # twice and normalise twice. Batching (padding to a multiple of 32) still happens.
    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0], image_std=[1.0])

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict | None = None) -> tuple[Tensor, dict | None]:
        return image, target


class FasterRCNN(TorchvisionFasterRCNN, Detector):
    """torchvision's FasterRCNN with 0-based user labels and batched-tensor input."""

    # torch.export cannot trace its data-dependent box filtering (the RPN's and RoIHeads'
    # score thresholds and NMS); the TorchScript exporter traces this one image's path.
    onnx_exporter = "torchscript"

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
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image in the input's pixels (model in eval mode); it proposes
        its own boxes, so ``proposals`` is not read."""
        set_detection_limits(self.roi_heads, limits)
        return self(images)

    def feature_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The backbone's map of a batch as the box head pools it (padded to a multiple of
        32, as ``forward`` batches images)."""
        batch, _ = self.transform(list(images.unbind(0)))
        return self.backbone(batch.tensors)

    def scored_detections(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> tuple[Detections, BoxScores]:
        """``detect``'s detections and ``RoIScores``: each box's class probability on the
        RPN proposal that made it, the proposals held fixed."""
        return roi_scored_detections(self, images, limits, proposals)


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


@register_model(min_size=32, input_size=(3, 448, 448), task="detect", explain_layer="backbone")
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
