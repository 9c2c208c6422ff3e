"""A detector's evidence, one map per box: each box ``cnnlab predict`` finds, with the map
of the score the detector gave that box (``BoxScores``), and their drawing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from cnnlab.attribution import maps as attribution
from cnnlab.errors import CnnlabError
from cnnlab.explain.inputs import View, class_index, model_input, resolve_layer
from cnnlab.models.detection import PREDICT_LIMITS, DetectLimits
from cnnlab.runs import Run

# Methods that cannot tell a detector's boxes apart, and why (one line each).
BOX_REFUSALS = {
    "eigencam": "is class-agnostic (the layer's first principal component), so every box"
    " would get the same map",
}
DRAWN_BOXES = 12  # panels in one detection drawing (the highest scores; the JSON has all)


@dataclass
class BoxMap:
    """One detected box and the map of its score."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    class_name: str
    score: float  # the detection's score, the output explained
    map: Tensor  # (H, W) in [0, 1] over the model's input
    seconds: float


@dataclass
class BoxesExplanation:
    """One image's detections (as ``cnnlab predict`` finds them), each with its map."""

    file: str | None
    method: str
    layer: str
    boxes: list[BoxMap]
    image: Tensor  # uint8 (C, H, W) as read
    view: View
    seconds: float  # detecting and mapping every box

    @staticmethod
    def inside(point: tuple[float, float], box: Sequence[float]) -> bool:
        return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]

    def to_dict(self) -> dict:
        boxes = []
        for found in self.boxes:
            peak = self.view.peak(found.map)
            boxes.append(
                {
                    "box": [round(v, 2) for v in found.box],
                    "class": found.class_name,
                    "score": round(found.score, 6),
                    "method": self.method,
                    "layer": self.layer,
                    "peak_xy": None if peak is None else [round(v, 2) for v in peak],
                    "top10_share": round(attribution.top_share(found.map), 4),
                    "peak_in_box": None if peak is None else self.inside(peak, found.box),
                    "map_shape": list(found.map.shape),
                    "seconds": round(found.seconds, 4),
                }
            )
        return {
            "file": self.file,
            "method": self.method,
            "layer": self.layer,
            "boxes": boxes,
            "view_box": [round(v, 2) for v in self.view.box],
            "seconds": round(self.seconds, 4),
        }


def explain_boxes(
    run: Run,
    images: Sequence[Tensor],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    files: Sequence[str | None] | None = None,
    score_threshold: float | None = None,
) -> list[BoxesExplanation]:
    """A detection run's boxes in each image, as ``cnnlab predict`` finds them (its score
    threshold unless ``score_threshold`` is given; ``class_name``: only the boxes of that
    class), each with the ``method`` map of its own score: the score the detector gave that
    box, computed from the proposal or grid cell that made it
    (``Detector.scored_detections``), so two boxes have two different targets even where
    they share a class."""
    if method in BOX_REFUSALS:
        raise CnnlabError(f"{method} {BOX_REFUSALS[method]}; choose another --method")
    limits = box_limits(score_threshold)
    wanted = class_index(run, class_name)
    found = []
    name = None
    for i, image in enumerate(images):
        x = model_input(run, image)
        name = name or resolve_layer(run, layer, x)
        module = run.model.get_submodule(name)
        start = time.perf_counter()
        detections, x, scorer = run.task.scored_boxes(run.model, image, run.device, limits)
        boxes = []
        for k, (box, score, label) in enumerate(
            zip(
                detections["boxes"].tolist(),
                detections["scores"].tolist(),
                detections["labels"].tolist(),
                strict=True,
            )
        ):
            if wanted is not None and label != wanted:
                continue
            box_start = time.perf_counter()
            heat = attribution.attribute(scorer, x, box_score(k), method, module)[0].cpu()
            seconds = time.perf_counter() - box_start
            boxes.append(BoxMap(tuple(box), run.classes[label], score, heat, seconds))
        seconds = time.perf_counter() - start
        view = View.of(run, *image.shape[-2:])
        file = files[i] if files is not None else None
        found.append(BoxesExplanation(file, method, name, boxes, image, view, seconds))
    return found


def box_limits(score_threshold: float | None) -> DetectLimits:
    """``cnnlab predict``'s limits, at ``score_threshold`` when one is given."""
    if score_threshold is None:
        return PREDICT_LIMITS
    if not 0.0 <= score_threshold <= 1.0:
        raise CnnlabError(f"the score threshold must be in [0, 1], got {score_threshold}")
    return PREDICT_LIMITS.with_score(score_threshold)


def box_score(k: int) -> attribution.Target:
    """The score of the k-th box (a ``scored_detections`` module's output (N, K))."""

    def score(output: Tensor) -> Tensor:
        return output[:, k]

    return score


def draw_boxes(result: BoxesExplanation, out: Path) -> None:
    """One panel per box (the ``DRAWN_BOXES`` best): its map over the image, the box
    outlined, the peak marked, with one colour bar."""
    from cnnlab.explain_plots import plot_box_attributions

    shown = sorted(result.boxes, key=lambda b: -b.score)[:DRAWN_BOXES]
    panels = []
    for found in shown:
        peak = result.view.peak(found.map)
        if peak is None:
            where = "map all zero"
        else:
            where = f"peak {'in' if result.inside(peak, found.box) else 'outside'} box"
        label = f"{found.class_name} {found.score:.2f} ({where})"
        panels.append((found.map.numpy(), found.box, peak, label))
    count = len(result.boxes)
    title = f"{result.method} at {result.layer}: {count} box{'es' if count != 1 else ''}"
    if count > len(shown):
        title += f" (the {len(shown)} best drawn)"
    plot_box_attributions(result.image, panels, result.view.box, title, out)
