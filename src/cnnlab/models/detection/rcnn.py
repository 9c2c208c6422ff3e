"""R-CNN (Girshick et al. 2014, arXiv:1311.2524) on a cnnlab zoo backbone: one CNN forward
pass per region proposal.

Each selective-search proposal (``cnnlab.data.proposals``) is widened by context padding,
warped to a fixed square crop and run through the backbone; its pooled features go through
one fully connected layer (the paper's fc7). Training fine-tunes the network as a softmax
classifier over the classes and background on sampled proposals (IoU >= 0.5 with an object
is that object's class, the rest background; a quarter of each batch foreground, as the
paper's 32 of 128). After that, ``fit_after_training`` fits what the paper fits on cached
features: one linear SVM per class (positives the labelled boxes, negatives proposals
below IoU 0.3 with every object of the class, mined hard over a few rounds) and a ridge
regression per class from the features to the box offsets of proposals with IoU >= 0.6.
Until they are fitted, detection scores are the softmax's; after, the SVMs' and the boxes
are refined. Detections are kept per class by NMS.

Where it differs from the paper: the SVMs and the box regressors read the same fc7 features
(the paper regresses from pool5), the SVMs minimise the squared hinge loss by L-BFGS (the
paper used liblinear's hinge loss), the negatives are a random ``negatives_per_image`` of
each training image's proposals (the paper mined all ~2,000), and an SVM's margin m is
reported as the score sigmoid(2 m), so that 0.5 is its decision boundary and its support
planes (m = -1, +1) are 0.12 and 0.88.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align

from cnnlab.errors import CnnlabError
from cnnlab.models.detection.contract import EVAL_LIMITS, Detections, DetectLimits, Detector
from cnnlab.models.detection.roi_heads import (
    FORWARD_LIMITS,
    PROPOSALS_REFUSAL,
    proposal_settings,
)
from cnnlab.models.features import backbone as backbone_features
from cnnlab.registry import register_model

FOREGROUND_IOU = 0.5  # fine-tuning: a proposal is an object's class at this IoU or above
SVM_NEGATIVE_IOU = 0.3  # an SVM negative overlaps no object of its class this much
REGRESSION_IOU = 0.6  # a box regressor learns from proposals this close to an object
SVM_MARGIN = -1.0  # a negative scoring above this is inside the margin: a hard one
FEATURE_NORM = 20.0  # features are scaled to this mean L2 norm before the SVMs (the paper's)
SCORE_SLOPE = 2.0  # score = sigmoid(SCORE_SLOPE * margin)
CROPS_PER_PASS = 128  # crops per backbone forward at test time (memory, not speed)


def warp_regions(images: Tensor, boxes: list[Tensor], crop_size: int, context: int) -> Tensor:
    """Each box of each image widened so that ``context`` pixels of the image surround it
    once warped (the paper's p = 16 at 227), then warped to ``crop_size`` x ``crop_size``:
    (total boxes, C, crop_size, crop_size). Bilinear sampling with as many samples per
    output pixel as the box has input pixels there (roi_align, aligned), so an unscaled box
    is copied exactly and a shrunk one is averaged; outside the image is 0, which is the
    mean of a normalised image (the paper pads with the mean too)."""
    inner = crop_size - 2 * context
    widened = []
    for image_boxes in boxes:
        width = (image_boxes[:, 2] - image_boxes[:, 0]).clamp(min=1.0)
        height = (image_boxes[:, 3] - image_boxes[:, 1]).clamp(min=1.0)
        pad_x, pad_y = width * context / inner, height * context / inner
        widened.append(image_boxes + torch.stack([-pad_x, -pad_y, pad_x, pad_y], dim=1))
    return roi_align(images, widened, crop_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def hard_negatives(scores: Tensor, active: Tensor, limit: int) -> Tensor:
    """Indices of the at most ``limit`` highest-scoring negatives that are not ``active``
    yet and score above the margin (``SVM_MARGIN``): those the SVM gets most wrong."""
    candidates = torch.where(~active & (scores > SVM_MARGIN), scores, float("-inf"))
    count = min(limit, int(torch.isfinite(candidates).sum()))
    return candidates.topk(count).indices


def train_linear_svm(
    features: Tensor, positive: Tensor, cost: float, positive_weight: float = 2.0
) -> tuple[Tensor, Tensor]:
    """(weight (D,), bias ()) of a linear SVM: minimises ||w||^2 / 2 + cost * sum of each
    sample's weight x squared hinge loss (a positive weighs ``positive_weight``, as the
    paper's liblinear ``-w1 2``), by L-BFGS; the bias is not penalised."""
    sign = positive.to(features.dtype) * 2 - 1
    weight = torch.where(positive, positive_weight, 1.0).to(features.dtype)
    w = torch.zeros(features.shape[1] + 1, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        margins = features @ w[:-1] + w[-1]
        hinge = (1 - sign * margins).clamp(min=0)
        loss = 0.5 * w[:-1].square().sum() + cost * (weight * hinge.square()).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    w = w.detach()
    return w[:-1], w[-1]


def ridge_regression(features: Tensor, targets: Tensor, penalty: float) -> Tensor:
    """(D + 1, T) weights W minimising ||[X 1] W - Y||^2 + penalty ||W without its bias
    row||^2: the closed form (X'X + penalty I) W = X'Y with the bias row unpenalised."""
    x = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    ridge = torch.full((x.shape[1],), penalty, dtype=features.dtype)
    ridge[-1] = 0.0
    return torch.linalg.solve(x.T @ x + torch.diag(ridge), x.T @ targets)


class RCNN(Detector):
    """R-CNN: proposals warped to crops, a backbone forward pass per crop, fc7, then a
    softmax (fine-tuning) or per-class linear SVMs and ridge box regressors (fitted after
    training by ``fit_after_training``). Proposals are given in the input's pixels:
    training reads each target's ``"proposals"``, ``detect`` takes them as an argument
    (without them the whole image is the one proposal). ``proposal_settings`` says where a
    task gets them (``cnnlab.data.proposals.ProposalSource``). Labels are 0-based."""

    export_refusal = PROPOSALS_REFUSAL
    explain_refusal = (
        "runs its backbone once per warped proposal, not once over the image, so no layer"
        " holds a map of the image; explain fasterrcnn, fastrcnn, sppnet or yolov1 runs"
    )

    def __init__(
        self,
        body: nn.Module,
        num_classes: int,
        crop_size: int,
        context_padding: int,
        representation_size: int,
        rois_per_image: int,
        foreground_fraction: float,
        svm_cost: float,
        hard_negative_rounds: int,
        negatives_per_image: int,
        box_ridge: float,
        proposal_settings: dict,
    ) -> None:
        super().__init__()
        self.backbone = body
        self.fc7 = nn.Linear(body.out_channels, representation_size)
        self.classifier = nn.Linear(representation_size, num_classes + 1)  # 0: background
        # Fitted after training; saved with the weights. ``fitted`` is 1 once they are.
        self.register_buffer("svm_weight", torch.zeros(num_classes, representation_size))
        self.register_buffer("svm_bias", torch.zeros(num_classes))
        self.register_buffer("box_weight", torch.zeros(num_classes, representation_size + 1, 4))
        self.register_buffer("feature_scale", torch.ones(1))
        self.register_buffer("fitted", torch.zeros(1))
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.context_padding = context_padding
        self.matcher = Matcher(FOREGROUND_IOU, FOREGROUND_IOU, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(rois_per_image, foreground_fraction)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))  # the paper's (dx, dy, dw, dh)
        self.svm_cost = svm_cost
        self.hard_negative_rounds = hard_negative_rounds
        self.negatives_per_image = negatives_per_image
        self.box_ridge = box_ridge
        self.proposal_settings = proposal_settings
        self.min_input_size = 32
        self.limits = FORWARD_LIMITS  # until detect sets the limits it is given

    @property
    def fitted(self) -> bool:
        """Whether the SVMs and box regressors are fitted: the ``fitted`` buffer, saved
        with the weights (1 once they are)."""
        flag = self._buffers.get("fitted")
        if flag is None:  # __init__ registering it: register_buffer needs the name unset
            raise AttributeError("fitted")
        return bool(flag.item())

    # -- features

    def features(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """fc7 features (total boxes, representation_size) of each box's warped crop."""
        crops = warp_regions(images, boxes, self.crop_size, self.context_padding)
        if self.training:
            return self._fc7(crops)
        parts = [self._fc7(part) for part in crops.split(CROPS_PER_PASS)]
        return torch.cat(parts) if parts else crops.new_zeros(0, self.fc7.out_features)

    def _fc7(self, crops: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.backbone(crops)["0"], 1).flatten(1)
        return torch.relu(self.fc7(pooled))

    # -- fine-tuning

    def _sampled(self, targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], Tensor]:
        """Per image, the sampled proposals (the objects' own boxes among them), and their
        classes (0 background, else user label + 1), as Fast R-CNN samples RoIs."""
        boxes, classes = [], []
        for target in targets:
            candidates = torch.cat([target["proposals"].float(), target["boxes"].float()])
            labels = torch.zeros(len(candidates), dtype=torch.int64, device=candidates.device)
            if len(target["boxes"]):
                matched = self.matcher(box_iou(target["boxes"].float(), candidates))
                labels = torch.where(matched >= 0, target["labels"][matched.clamp(min=0)] + 1, 0)
            boxes.append(candidates)
            classes.append(labels)
        positive, negative = self.sampler(classes)
        keep = [(p | n).bool() for p, n in zip(positive, negative, strict=True)]
        picked = [b[k] for b, k in zip(boxes, keep, strict=True)]
        return picked, torch.cat([c[k] for c, k in zip(classes, keep, strict=True)])

    def forward(
        self,
        images: Tensor | list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        proposals: list[Tensor] | None = None,
    ) -> dict[str, Tensor] | Detections:
        """Training: the softmax loss of sampled proposals under ``"loss"``. Eval:
        detections per image in the input's pixels, labels 0-based."""
        if isinstance(images, list):
            images = torch.stack(images)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets with boxes, labels and proposals")
            boxes, classes = self._sampled(targets)
            if not len(classes):  # no proposal and no object in the whole batch
                loss = sum(p.sum() for p in self.classifier.parameters()) * 0.0
            else:
                loss = F.cross_entropy(self.classifier(self.features(images, boxes)), classes)
            return {"loss": loss, "loss_classifier": loss}
        height, width = images.shape[-2:]
        if proposals is None:
            whole = torch.tensor([[0.0, 0.0, width, height]], device=images.device)
            proposals = [whole] * len(images)
        proposals = [p.to(images.device, torch.float32).reshape(-1, 4) for p in proposals]
        found = []
        for image, boxes in zip(images, proposals, strict=True):
            found.append(self._detect_one(image[None], boxes, (int(height), int(width))))
        return found

    def _detect_one(self, image: Tensor, boxes: Tensor, size: tuple[int, int]) -> dict:
        features = self.features(image, [boxes])
        count = len(boxes)
        if self.fitted:
            scaled = features * self.feature_scale
            scores = torch.sigmoid(SCORE_SLOPE * (scaled @ self.svm_weight.T + self.svm_bias))
            with_bias = torch.cat([scaled, torch.ones_like(scaled[:, :1])], dim=1)
            deltas = torch.einsum("nd,kdt->nkt", with_bias, self.box_weight)
            refined = self.box_coder.decode_single(deltas.reshape(count, -1), boxes)
        else:
            scores = torch.softmax(self.classifier(features), dim=1)[:, 1:]
            refined = boxes.repeat(1, self.num_classes)
        refined = clip_boxes_to_image(refined.reshape(count, self.num_classes, 4), size)
        labels = torch.arange(self.num_classes, device=boxes.device).expand(count, -1)
        refined, scores, labels = refined.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
        keep = torch.where(scores > self.limits.score_threshold)[0]
        keep = keep[remove_small_boxes(refined[keep], 1e-2)]
        nms = self.limits.nms_threshold
        keep = keep[batched_nms(refined[keep], scores[keep], labels[keep], nms)]
        keep = keep[: self.limits.max_detections]
        return {"boxes": refined[keep], "scores": scores[keep], "labels": labels[keep]}

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image in the input's pixels (model in eval mode)."""
        self.limits = limits
        return self(images, proposals=proposals)

    # -- after training: the SVMs and the box regressors

    @torch.no_grad()
    def fit_after_training(self, batches: Iterable[tuple[Tensor, list[dict]]]) -> str:
        """Fit the per-class SVMs (with hard-negative mining) and box regressors on the
        fc7 features of ``batches``: (images, targets with boxes, labels and proposals), the
        training images as the model sees them at test time. Returns what it fitted."""
        self.eval()
        pool = self._feature_pool(batches)
        features = [pool["object_features"], pool["proposal_features"]]
        norms = torch.cat(features).norm(dim=1).mean()
        scale = FEATURE_NORM / norms.clamp(min=1e-6)
        objects = pool["object_features"] * scale
        proposals = pool["proposal_features"] * scale
        mined = 0
        for c in range(self.num_classes):
            positives = objects[pool["object_labels"] == c]
            negatives = proposals[pool["class_iou"][:, c] < SVM_NEGATIVE_IOU]
            weight, bias, used = self._mined_svm(positives, negatives)
            self.svm_weight[c], self.svm_bias[c] = weight, bias
            mined += used
            close = pool["regression_labels"] == c
            if close.any():
                targets = self.box_coder.encode_single(
                    pool["regression_objects"][close], pool["regression_boxes"][close]
                )
                wanted = pool["regression_features"][close] * scale
                self.box_weight[c] = ridge_regression(
                    wanted.double(), targets.double(), self.box_ridge
                )
        self.feature_scale.fill_(scale.item())
        self._buffers["fitted"].fill_(1.0)  # the buffer behind the ``fitted`` property
        return (
            f"fitted {self.num_classes} linear SVMs on {len(objects)} labelled boxes and"
            f" {mined} negatives (of {len(proposals)} proposals: a random share, then"
            f" {self.hard_negative_rounds - 1} rounds of the hardest) and box regressors on"
            f" {len(pool['regression_labels'])} proposals with IoU >= {REGRESSION_IOU}"
        )

    def _feature_pool(self, batches: Iterable[tuple[Tensor, list[dict]]]) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(0)  # which proposals: the same every time
        parts: dict[str, list[Tensor]] = {}
        device = self.fc7.weight.device

        def add(name: str, value: Tensor) -> None:
            parts.setdefault(name, []).append(value.detach().cpu())

        for images, targets in batches:
            images = images.to(device)
            for image, target in zip(images, targets, strict=True):
                objects = target["boxes"].float().to(device)
                labels = target["labels"].to(device)
                proposals = target["proposals"].float().to(device).reshape(-1, 4)
                iou = box_iou(proposals, objects)  # (proposals, objects)
                class_iou = torch.zeros(len(proposals), self.num_classes, device=device)
                for c in labels.unique().tolist():
                    class_iou[:, c] = iou[:, labels == c].max(dim=1).values
                best, match = iou.max(dim=1) if len(objects) else (class_iou[:, 0], None)
                order = torch.randperm(len(proposals), generator=generator)
                sampled = order[: self.negatives_per_image].to(device)
                close = torch.where(best >= REGRESSION_IOU)[0] if match is not None else sampled[:0]
                boxes = [objects, proposals[sampled], proposals[close]]
                found = self.features(image[None], [torch.cat(boxes)])
                first, second = len(objects), len(objects) + len(sampled)
                add("object_features", found[:first])
                add("object_labels", labels)
                add("proposal_features", found[first:second])
                add("class_iou", class_iou[sampled])
                add("regression_features", found[second:])
                add("regression_boxes", proposals[close])
                if match is not None:
                    add("regression_objects", objects[match[close]])
                    add("regression_labels", labels[match[close]])
        if "object_features" not in parts:
            raise CnnlabError("no training images to fit the SVMs on")
        width = self.fc7.out_features
        empty = {
            "regression_objects": torch.zeros(0, 4),
            "regression_labels": torch.zeros(0, dtype=torch.int64),
        }
        pool = {name: torch.cat(values) for name, values in parts.items()}
        for name, value in empty.items():
            pool.setdefault(name, value)
        pool["object_features"] = pool["object_features"].reshape(-1, width)
        return pool

    def _mined_svm(self, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor, int]:
        """(weight, bias, negatives trained on) of one class's SVM. The first round takes
        a random share of the negatives (a zero model scores them all alike); each later
        round adds the hard negatives the last SVM scores highest."""
        dim = positives.shape[1]
        if not len(positives) or not len(negatives):
            return torch.zeros(dim), torch.tensor(-10.0), 0  # no SVM to train: never fires
        limit = max(len(positives) * 4, 256)  # negatives added per round
        active = torch.zeros(len(negatives), dtype=torch.bool)
        first = torch.randperm(len(negatives), generator=torch.Generator().manual_seed(1))
        active[first[:limit]] = True
        weight, bias = torch.zeros(dim), torch.zeros(())
        for round_ in range(max(1, self.hard_negative_rounds)):
            if round_:
                hard = hard_negatives(negatives @ weight + bias, active, limit)
                if not len(hard):
                    break  # every negative is beyond the margin: mining is done
                active[hard] = True
            chosen = negatives[active]
            x = torch.cat([positives, chosen]).double()
            y = torch.cat([torch.ones(len(positives)), torch.zeros(len(chosen))]).bool()
            weight, bias = train_linear_svm(x, y, self.svm_cost)
            weight, bias = weight.float(), bias.float()
        return weight, bias, int(active.sum())


@register_model(min_size=32, input_size=(3, 448, 448), task="detect", explain_layer="backbone")
def rcnn(
    num_classes: int = 20,
    in_channels: int = 3,
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    reduction: int = 32,
    crop_size: int = 224,
    context_padding: int = 16,
    representation_size: int = 1024,
    rois_per_image: int = 32,
    foreground_fraction: float = 0.25,
    svm_cost: float = 0.001,
    hard_negative_rounds: int = 3,
    negatives_per_image: int = 64,
    box_ridge: float = 1000.0,
    proposal_mode: str = "fast",
    max_proposals: int = 2000,
    proposal_file: str | None = None,
) -> RCNN:
    """R-CNN: each proposal widened by ``context_padding`` pixels (at the warped size),
    warped to ``crop_size`` square and run through the backbone (up to its ``reduction``
    level, average-pooled) and fc7 (``representation_size`` wide); fine-tuned as a softmax
    over the classes and background on ``rois_per_image`` proposals per image
    (``foreground_fraction`` of them IoU >= 0.5 with an object; with ``--batch-size 4``,
    the paper's 128 per batch, 32 foreground), then per-class linear SVMs (``svm_cost``,
    ``hard_negative_rounds`` of mining over ``negatives_per_image`` proposals of each
    image) and ridge box regressors (``box_ridge``, the paper's 1000). Proposals come from
    ``cnnlab detect proposals``' cache (``proposal_mode``, ``max_proposals``) or from
    ``proposal_file`` (docs/proposals.md). ``num_classes`` counts object classes without
    background."""
    body, _ = backbone_features(backbone, [reduction], in_channels, backbone_weights)
    if crop_size <= 2 * context_padding:
        raise CnnlabError(
            f"crop_size {crop_size} leaves no room for the box: context_padding"
            f" {context_padding} takes {2 * context_padding} of it"
        )
    if crop_size < body.min_input_size:
        raise CnnlabError(f"crop_size {crop_size} is below {backbone}'s {body.min_input_size} px")
    settings = proposal_settings(proposal_mode, max_proposals, proposal_file)
    return RCNN(
        body, num_classes, crop_size, context_padding, representation_size, rois_per_image,
        foreground_fraction, svm_cost, hard_negative_rounds, negatives_per_image, box_ridge,
        settings,
    )  # fmt: skip
