"""YOLOv1 (Redmon et al. 2016, "You Only Look Once", arXiv:1506.02640) on a zoo backbone.

The image is divided into an S x S grid; each cell predicts B boxes (x, y, w, h,
confidence) and one set of C class probabilities, so the output is S x S x (B*5 + C).
x, y are the box centre's offset inside its cell and w, h its size relative to the image,
all in 0..1; confidence is Pr(object) x IoU(box, truth).

Where this differs from the paper, and why:

* The backbone is any zoo model, cut at its stride-32 ``feature_info`` level (``reduction``
  picks another) instead of the paper's 24-layer Darknet. Two 3x3 conv layers (the paper
  has four, 1024 wide) refine it and an adaptive average pool brings the map to S x S: at
  the paper's 448 input the stride-32 map is 14 x 14 and the pool halves it, where the
  paper uses a stride-2 conv. With the paper's fully connected head any input size works
  (the FC layers see every cell anyway).
* The head is narrower (``head_channels`` 256 and ``hidden`` 1024 instead of 1024 and
  4096) so that it trains on a CPU, and the convs have batch norm (from YOLOv2), which
  lets it train from scratch without the paper's ImageNet pre-training.
* ``head="conv"`` replaces the two FC layers with one 1x1 conv applied to every cell
  (YOLOv2's step away from v1). The FC head must learn each cell's mapping separately
  and, trained from scratch on a few hundred images, barely learns at all (mAP@0.5 0.01
  after 3 epochs on 700 shapes images where the conv head reaches 0.63); the conv head is
  what the shapes benchmark and demo use. Give it ``grid`` = input size / ``reduction``
  so that every cell sits on its own feature position (e.g. 128 / 16 = 8).
* The last layer's outputs pass through a sigmoid (box and confidence) and a softmax
  (class probabilities) instead of the paper's linear activation, so every output is in
  its valid range and sqrt(w) is always defined; the loss is still the paper's sum of
  squared errors on these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from cnnlab.errors import CnnlabError
from cnnlab.models.blocks import ConvBNAct, check_rate
from cnnlab.models.detection.contract import (
    EVAL_LIMITS,
    BoxScores,
    Detections,
    DetectLimits,
    Detector,
    GraphOutputs,
)
from cnnlab.models.features import backbone as backbone_features
from cnnlab.registry import register_model


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)  # the paper's activation


class _ChannelsLast(nn.Module):
    """(N, C, S, S) -> (N, S, S, C): a conv head's output in the paper's layout."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def cell_offsets(grid: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Column and row index of every cell, each (S, S, 1) to broadcast over the B boxes."""
    rows, cols = torch.meshgrid(
        torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij"
    )
    return cols[..., None].float(), rows[..., None].float()


def cell_boxes_to_xyxy(boxes: Tensor, grid: int) -> Tensor:
    """(..., S, S, B, 4) cell-relative (x, y, w, h) -> image-relative (x1, y1, x2, y2)."""
    col, row = cell_offsets(grid, boxes.device)
    cx = (col + boxes[..., 0]) / grid
    cy = (row + boxes[..., 1]) / grid
    half_w, half_h = boxes[..., 2] / 2, boxes[..., 3] / 2
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a[i] and b[i] (xyxy, broadcasting), not the all-pairs matrix."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def encode_targets(
    targets: list[dict[str, Tensor]], grid: int, num_classes: int, image_size: tuple[int, int]
) -> Tensor:
    """Ground truth as (N, S, S, 5 + C): x, y (in the cell), w, h (of the image), an
    object flag and the one-hot class, in the cell holding the box centre.

    As in the paper a cell holds one object; when two centres share a cell the larger box
    is kept (it is the one a single prediction can match best).
    """
    height, width = image_size
    device = targets[0]["boxes"].device if targets else None
    encoded = torch.zeros(len(targets), grid, grid, 5 + num_classes, device=device)
    for n, target in enumerate(targets):
        boxes, labels = target["boxes"], target["labels"]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for k in area.argsort().tolist():  # smallest first, so larger boxes overwrite
            x1, y1, x2, y2 = boxes[k].tolist()
            cx, cy = (x1 + x2) / 2 / width * grid, (y1 + y2) / 2 / height * grid
            col, row = min(int(cx), grid - 1), min(int(cy), grid - 1)
            cell = encoded[n, row, col]
            cell.zero_()
            cell[:4] = torch.tensor([cx - col, cy - row, (x2 - x1) / width, (y2 - y1) / height])
            cell[4] = 1.0
            cell[5 + int(labels[k])] = 1.0
    return encoded


@dataclass
class YOLOLoss:
    """The paper's sum-squared loss, summed over the grid and averaged over images.

    In a cell with an object the one of its B boxes with the highest IoU with the truth is
    "responsible": it alone gets the coordinate loss (weighted ``lambda_coord``, on the
    square roots of w and h so that an error counts more on a small box) and the object
    confidence loss. Every other box is pushed towards confidence 0 with weight
    ``lambda_noobj``. The class loss applies to cells with an object. With ``rescore``
    (the paper, and darknet's ``rescore=1``) the confidence target is that IoU, else 1.
    """

    grid: int = 7
    boxes: int = 2
    num_classes: int = 20
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    rescore: bool = True

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """pred (N, S, S, B*5 + C) from the model, target (N, S, S, 5 + C) from
        ``encode_targets``; returns ``loss`` and its parts ``coord``, ``obj``, ``noobj``,
        ``class``."""
        n, b = pred.shape[0], self.boxes
        boxes = pred[..., : b * 5].unflatten(-1, (b, 5))  # (N, S, S, B, 5)
        probs = pred[..., b * 5 :]  # (N, S, S, C)
        truth = target[..., None, :4]  # (N, S, S, 1, 4)
        has_object = target[..., 4] > 0  # (N, S, S)
        iou = paired_iou(
            cell_boxes_to_xyxy(boxes[..., :4], self.grid), cell_boxes_to_xyxy(truth, self.grid)
        ).detach()  # (N, S, S, B)
        responsible = nn.functional.one_hot(iou.argmax(-1), b).bool() & has_object[..., None]
        xy_error = (boxes[..., :2] - truth[..., :2]).square().sum(-1)
        wh_error = (_sqrt(boxes[..., 2:4]) - _sqrt(truth[..., 2:4])).square().sum(-1)
        confidence = boxes[..., 4]  # (N, S, S, B)
        conf_target = iou if self.rescore else torch.ones_like(iou)
        coord = self.lambda_coord * ((xy_error + wh_error) * responsible).sum() / n
        obj = ((confidence - conf_target).square() * responsible).sum() / n
        noobj = self.lambda_noobj * (confidence.square() * ~responsible).sum() / n
        cls = ((probs - target[..., 5:]).square().sum(-1) * has_object).sum() / n
        return {
            "loss": coord + obj + noobj + cls,
            "coord": coord,
            "obj": obj,
            "noobj": noobj,
            "class": cls,
        }


def _sqrt(x: Tensor) -> Tensor:
    # The gradient of sqrt is infinite at 0; a predicted size of exactly 0 must not blow up.
    return (x + 1e-9).sqrt()


def candidate_scores(pred: Tensor, boxes: int) -> Tensor:
    """Model output (N, S, S, B*5 + C) -> (N, S*S*B, C): each box's class-specific
    confidence, the paper's box confidence x Pr(class | object) of its cell."""
    cells = pred[..., : boxes * 5].unflatten(-1, (boxes, 5))  # (N, S, S, B, 5)
    probs = pred[..., boxes * 5 :].unsqueeze(-2)  # (N, S, S, 1, C), shared by the B boxes
    return (cells[..., 4:5] * probs).reshape(pred.shape[0], -1, probs.shape[-1])


def decode(
    pred: Tensor, boxes: int, image_size: tuple[int, int], limits: DetectLimits = EVAL_LIMITS
) -> Detections:
    """Model output (N, S, S, B*5 + C) -> detections per image in pixels of ``image_size``.

    Each box and class gets the paper's class-specific confidence (``candidate_scores``);
    candidates above the limits' score threshold go through per-class NMS and the
    ``max_detections`` best are kept.
    """
    return decode_with_sources(pred, boxes, image_size, limits)[0]


def decode_with_sources(
    pred: Tensor, boxes: int, image_size: tuple[int, int], limits: DetectLimits = EVAL_LIMITS
) -> tuple[Detections, list[Tensor]]:
    """``decode``, and for each image the index (in S*S*B order) of the cell's box that
    made each detection."""
    n, grid = pred.shape[0], pred.shape[1]
    height, width = image_size
    cells = pred[..., : boxes * 5].unflatten(-1, (boxes, 5))  # (N, S, S, B, 5)
    scale = torch.tensor([width, height, width, height], device=pred.device)
    xyxy = cell_boxes_to_xyxy(cells[..., :4], grid) * scale
    xyxy = clip_boxes_to_image(xyxy.reshape(n, -1, 4), (height, width))  # (N, S*S*B, 4)
    scores = candidate_scores(pred, boxes)  # (N, S*S*B, C)
    detections, sources = [], []
    for image_boxes, image_scores in zip(xyxy, scores, strict=True):
        box_index, labels = (image_scores > limits.score_threshold).nonzero(as_tuple=True)
        kept_scores = image_scores[box_index, labels]
        keep = batched_nms(image_boxes[box_index], kept_scores, labels, limits.nms_threshold)
        keep = keep[: limits.max_detections]  # batched_nms sorts by decreasing score
        detections.append(
            {
                "boxes": image_boxes[box_index[keep]],
                "scores": kept_scores[keep],
                "labels": labels[keep],
            }
        )
        sources.append(box_index[keep])
    return detections, sources


class CellBoxScores(BoxScores):
    """Each of K detections' class-specific confidence (N, K) for inputs (N, C, H, W): the
    confidence of the cell's box that made it (``sources``, in S*S*B order) x its cell's
    probability of its class."""

    def __init__(self, detector: YOLOv1, sources: Tensor, labels: Tensor) -> None:
        super().__init__(detector, labels)
        self.sources = sources

    def on(self, detector: YOLOv1) -> CellBoxScores:
        return CellBoxScores(detector, self.sources, self.labels)

    def forward(self, x: Tensor) -> Tensor:
        scores = candidate_scores(self.detector(x), self.detector.boxes)
        return scores[:, self.sources, self.labels]


def decoding(limits: DetectLimits) -> str:
    """How to decode an exported YOLOv1 grid, in words (the file's "decoding")."""
    return (
        "output (N, S, S, B*5 + C): per cell, B boxes (x, y, w, h, confidence) then C class "
        "probabilities; x, y are the box centre inside its cell and w, h its size relative to "
        "the input, all in 0..1. A box's score for class c is confidence * p(c); candidates "
        f"above a score threshold go through per-class NMS at IoU {limits.nms_threshold}, at"
        f" most {limits.max_detections} per image (cnnlab.models.detection.yolov1.decode)."
        " Boxes are in the input's pixels; scale them back to the original image by its"
        " width/W and height/H."
    )


class YOLOv1(Detector):
    """Zoo backbone -> two 3x3 convs -> pool to S x S -> two FC layers (``head="fc"``, the
    paper's) or one 1x1 conv shared by every cell (``head="conv"``). Exported as its raw
    grid, decoded outside the graph by ``decode``."""

    graph_is_forward = True
    graph_output = "yolov1_grid"
    graph_outputs = ("grid",)

    def __init__(
        self,
        backbone: nn.Module,
        backbone_channels: int,
        num_classes: int,
        grid: int = 7,
        boxes: int = 2,
        head_channels: int = 256,
        hidden: int = 1024,
        dropout: float = 0.5,
        head: str = "fc",
        loss: YOLOLoss | None = None,
    ) -> None:
        super().__init__()
        if head not in ("fc", "conv"):
            raise CnnlabError(f"yolov1: head must be fc or conv, got {head!r}")
        dropout = check_rate("yolov1", "dropout", dropout)
        self.grid, self.boxes, self.num_classes = grid, boxes, num_classes
        self.backbone = backbone
        self.neck = nn.Sequential(
            ConvBNAct(backbone_channels, head_channels, 3, act_layer=_leaky),
            ConvBNAct(head_channels, head_channels, 3, act_layer=_leaky),
            nn.AdaptiveAvgPool2d(grid),
        )
        per_cell = boxes * 5 + num_classes
        if head == "fc":
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(head_channels * grid * grid, hidden),
                _leaky(),
                nn.Dropout(dropout),  # the paper's rate, after the first FC layer
                nn.Linear(hidden, grid * grid * per_cell),
                nn.Unflatten(-1, (grid, grid, per_cell)),
            )
        else:
            # Every cell shares one predictor, so each object teaches all cells at once.
            self.head = nn.Sequential(nn.Conv2d(head_channels, per_cell, 1), _ChannelsLast())
        self.loss = loss or YOLOLoss(grid, boxes, num_classes)

    def forward(
        self, x: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> Tensor | dict[str, Tensor]:
        """(N, C, H, W) -> (N, S, S, B*5 + C): boxes and confidences in 0..1, then class
        probabilities summing to 1. With ``targets`` (boxes in the images' pixels), the
        ``YOLOLoss`` dict (``"loss"`` and its parts) instead, as torchvision's detectors do
        in training (so DistributedDataParallel, which wraps ``forward``, sees the whole
        step)."""
        features = self.backbone(x)["0"]  # (N, Cb, H/r, W/r)
        out = self.head(self.neck(features))  # (N, S, S, B*5 + C)
        split = self.boxes * 5
        pred = torch.cat((out[..., :split].sigmoid(), out[..., split:].softmax(-1)), dim=-1)
        if targets is None:
            return pred
        encoded = encode_targets(targets, self.grid, self.num_classes, x.shape[-2:])
        return self.loss(pred.float(), encoded)  # sums of squares in full precision

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image in the input's pixels, labels 0-based (it needs no
        ``proposals``)."""
        return decode(self(images), self.boxes, images.shape[-2:], limits)

    def scored_detections(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> tuple[Detections, CellBoxScores]:
        """``detect``'s detections and ``CellBoxScores``: each box's score is read from the
        cell and box that made it."""
        with torch.no_grad():
            found, sources = decode_with_sources(
                self(images), self.boxes, images.shape[-2:], limits
            )
        return found, CellBoxScores(self, sources[0], found[0]["labels"])

    def graph_metadata(self, limits: DetectLimits) -> dict[str, Any]:
        return {"decoding": decoding(limits), "detect": {"boxes": self.boxes, "grid": self.grid}}

    @classmethod
    def decode_graph(
        cls,
        outputs: GraphOutputs,
        images: Tensor,
        limits: DetectLimits,
        settings: dict[str, Any],
        name: str,
    ) -> Detections:
        """The exported grid of ``images`` decoded as ``detect`` decodes the model's."""
        grid = outputs(images)[0]
        return decode(grid, settings["boxes"], tuple(images.shape[-2:]), limits)


@register_model(min_size=32, input_size=(3, 448, 448), task="detect", explain_layer="backbone")
def yolov1(
    num_classes: int = 20,
    in_channels: int = 3,
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    grid: int = 7,
    boxes: int = 2,
    head_channels: int = 256,
    hidden: int = 1024,
    dropout: float = 0.5,
    head: str = "fc",
    reduction: int = 32,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
    rescore: bool = True,
) -> YOLOv1:
    """YOLOv1: an S x S grid (``grid``) of ``boxes`` boxes each plus class probabilities on
    the stride-``reduction`` features of the zoo model ``backbone``; ``backbone_weights`` is
    a weight file (or ``"torchvision"``) for it. ``head`` is "fc" (the paper's two fully
    connected layers) or "conv" (one 1x1 conv shared by every cell). Loss weights as in the
    paper; ``rescore`` makes the confidence target the IoU (the paper) rather than 1."""
    body, _ = backbone_features(backbone, [reduction], in_channels, backbone_weights)
    channels = body.out_channels
    loss = YOLOLoss(grid, boxes, num_classes, lambda_coord, lambda_noobj, rescore)
    model = YOLOv1(
        body, channels, num_classes, grid, boxes, head_channels, hidden, dropout, head, loss
    )
    model.min_input_size = max(32, body.min_input_size)
    return model
