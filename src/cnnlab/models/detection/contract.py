"""The detector contract: ``DetectLimits`` (what a detector keeps of its candidates at test
time, the defaults stated once) and ``Detector``, the base class of every detection model,
which the detection task, export and the ONNX Runtime backend call instead of asking which
model they hold."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from torch import Tensor, nn

from cnnlab.errors import CnnlabError

Detections = list[dict[str, Tensor]]  # per image: boxes (N, 4) xyxy, scores (N,), labels (N,)
GraphOutputs = Callable[[Tensor], list[Tensor]]  # an exported graph: batch -> its outputs


@dataclass(frozen=True)
class DetectLimits:
    """What ``Detector.detect`` keeps: candidates scoring above ``score_threshold``, per-class
    NMS at IoU ``nms_threshold``, the ``max_detections`` best per image. The defaults are
    evaluation's (COCO's): a threshold low enough to keep the whole precision-recall curve."""

    score_threshold: float = 0.001
    nms_threshold: float = 0.5
    max_detections: int = 100  # as COCO's evaluation counts them

    def with_score(self, score_threshold: float) -> DetectLimits:
        """These limits at another score threshold (a user's ``--score-threshold``)."""
        return replace(self, score_threshold=score_threshold)


EVAL_LIMITS = DetectLimits()  # detect eval, validation, export and its parity check
PREDICT_LIMITS = EVAL_LIMITS.with_score(0.25)  # predict and drawings: the confident boxes

_GRAPHS: dict[str, type[Detector]] = {}  # exported "output" kind -> the class that decodes it


class Detector(nn.Module):
    """What every detection model is to the rest of cnnlab (torchvision's detection
    contract, plus what export needs to know about it).

    Train mode: ``model(images, targets)`` returns ``{"loss": total, **parts}`` (a detector
    needs its targets inside the forward pass: Faster R-CNN samples anchors and RoIs from
    them). Eval mode: ``detect(images, limits)`` returns one dict of ``boxes`` (N, 4) xyxy
    in the input's pixels, ``scores`` (N,) and 0-based ``labels`` (N,) per image.

    A subclass overrides ``detect`` and, where they differ from these defaults, the
    attributes below: after-training fitting (R-CNN's SVMs), external proposals (the
    R-CNN family before Faster R-CNN) and how it exports.
    """

    # None, or why no exported graph can hold the model: the end of "NAME ..." in one line.
    export_refusal: ClassVar[str | None] = None
    # Which ONNX exporter writes it: "dynamo" (torch.export's program), or "torchscript"
    # where torch.export cannot trace the model (data-dependent box filtering).
    onnx_exporter: ClassVar[str] = "dynamo"
    # True: the graph is the model's own forward over a batch and ``decode_graph`` decodes
    # its raw outputs; False: the graph is ``detect`` on one image, the limits built in.
    graph_is_forward: ClassVar[bool] = False
    graph_output: ClassVar[str] = "detections"  # the exported file's "output"
    graph_outputs: ClassVar[tuple[str, ...]] = ("boxes", "scores", "labels")  # their names
    # Where a task gets the proposals ``detect`` takes ({"mode", "max_boxes", "file"} for
    # ``cnnlab.data.proposals.ProposalSource``); None: the model finds its own boxes.
    proposal_settings: dict | None = None
    # None, or why ``cnnlab explain`` cannot map its boxes: the end of "NAME ..." in one line.
    explain_refusal: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "graph_output" in cls.__dict__:  # a class that exports a graph of its own kind
            _GRAPHS[cls.graph_output] = cls

    def detect(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> Detections:
        """Detections per image of the batch ``images`` (B, C, H, W), in its pixels (model
        in eval mode). ``proposals``: boxes (M, 4) per image for a model with
        ``proposal_settings`` (without them the whole image is the one proposal)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement detect")

    def scored_detections(
        self,
        images: Tensor,
        limits: DetectLimits = EVAL_LIMITS,
        proposals: list[Tensor] | None = None,
    ) -> tuple[Detections, BoxScores]:
        """``detect``'s detections of one image ``images`` (1, C, H, W), and a module that
        maps inputs shaped like it (N, C, H, W) to each of those K detections' score (N, K)
        as the detector computes it, differentiably, with whatever fixed the box's place
        (its proposal, its grid cell) held fixed: at ``images`` it returns the detections'
        own scores. ``cnnlab explain`` maps where each box's evidence lies through it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement scored_detections")

    @property
    def fitted(self) -> bool:
        """Whether ``fit_after_training`` has nothing left to fit on these weights."""
        return True

    def fit_after_training(self, batches: Iterable[tuple[Tensor, list[dict]]]) -> str | None:
        """Fit what the model fits after training (R-CNN: its SVMs and box regressors) on
        ``batches`` of (images, targets with boxes, labels and proposals); a line saying
        what was fitted, or None when there is nothing to fit (the default)."""
        return None

    # -- export

    def graph(self, limits: DetectLimits) -> nn.Module:
        """The module export traces: the model itself, or its detections of one image."""
        return self if self.graph_is_forward else DetectionsGraph(self, limits).eval()

    def graph_metadata(self, limits: DetectLimits) -> dict[str, Any]:
        """The exported file's "decoding" (in words) and "detect" (what decoding reads)."""
        return {
            "decoding": (
                "already decoded for one image: boxes (M, 4) x1, y1, x2, y2 in the input's"
                " pixels, scores (M,) sorted descending, labels (M,) indexing classes; after"
                f" per-class NMS at IoU {limits.nms_threshold}, scores >="
                f" {limits.score_threshold}, at most {limits.max_detections}"
            ),
            "detect": asdict(limits),
        }

    @classmethod
    def decode_graph(
        cls,
        outputs: GraphOutputs,
        images: Tensor,
        limits: DetectLimits,
        settings: dict[str, Any],
        name: str,
    ) -> Detections:
        """Detections of ``images`` from the exported graph ``outputs`` (file ``name``,
        its "detect" metadata ``settings``) under ``limits``. This graph has NMS, its
        threshold and a low score threshold built in: a higher threshold and a smaller cap
        filter its sorted detections without changing the others (a box under the
        threshold only ever suppresses boxes scoring lower still)."""
        if limits.nms_threshold != settings["nms_threshold"]:
            raise CnnlabError(
                f"{name} has NMS at IoU {settings['nms_threshold']} built in, not"
                f" {limits.nms_threshold}"
            )
        if limits.score_threshold < settings["score_threshold"]:
            raise CnnlabError(
                f"{name} keeps scores of {settings['score_threshold']} and above only"
            )
        found = []
        for image in images:
            boxes, scores, labels = outputs(image[None])
            keep = (scores >= limits.score_threshold).nonzero().flatten()
            keep = keep[: limits.max_detections]
            found.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return found


_GRAPHS[Detector.graph_output] = Detector


class BoxScores(nn.Module):
    """What ``Detector.scored_detections`` returns: inputs (N, C, H, W) -> the score of
    each of K detections (N, K), read from ``detector`` where the detections came from
    (a proposal, a grid cell) for their classes ``labels`` (K,)."""

    def __init__(self, detector: Detector, labels: Tensor) -> None:
        super().__init__()
        self.detector = detector
        self.labels = labels

    def on(self, detector: Detector) -> BoxScores:
        """The same boxes' scores read from another detector of the same architecture (the
        audit's copies with randomised weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement on")


class DetectionsGraph(nn.Module):
    """A detector's ``detect`` on one image as three tensors, ``limits`` built in."""

    def __init__(self, detector: Detector, limits: DetectLimits) -> None:
        super().__init__()
        self.detector = detector
        self.limits = limits

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        found = self.detector.detect(images, self.limits)
        return found[0]["boxes"], found[0]["scores"], found[0]["labels"]


def graph_decoder(output: str) -> type[Detector] | None:
    """The detector class that decodes an exported graph whose "output" is ``output``;
    None for one that is no detector's (logits). Every detector class is defined once
    ``cnnlab.models.detection`` is imported (its package imports every family)."""
    return _GRAPHS.get(output)
