"""Explain a run's predictions (``cnnlab explain``), and check that the explanations mean
something (``--audit``).

``explain(run, images)`` maps where the evidence for one output lies in each image
(``cnnlab.attribution`` computes the maps): a classifier's class (the predicted one by
default), a segmenter's class over the region its mask gives that class, a detector's
score for each box it finds (one map per box, ``explain_boxes``). The map covers the
model's view of the image (a classifier's centre crop, a segmenter's or a detector's whole
image) and its peak is given in the image's own pixels.

``audit(run, images)`` runs the two sanity checks the literature asks of a saliency map:

- cascading model-parameter randomisation (Adebayo et al., "Sanity Checks for Saliency
  Maps", NeurIPS 2018): the weights are re-initialised from the head down, block by block,
  and each map compared with the trained model's by Spearman rank correlation. A map that
  explains the model must change when the model does: a method passes when the
  correlation is below ``RANDOMISED_PASS`` once the head and the top block are random.
- deletion and insertion (Petsiuk et al., "RISE", BMVC 2018): the pixels are removed
  (replaced by the mean colour) or inserted (into a blurred copy) in the map's order, and
  the class probability's area under the curve compared with a random map's. A faithful
  map deletes evidence faster (lower AUC) and inserts it faster (higher AUC).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.attribution import maps as attribution
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.models.detection import PREDICT_LIMITS, DetectLimits
from cnnlab.models.detection.contract import BoxScores
from cnnlab.models.factory import model_info
from cnnlab.registry import check_input_size
from cnnlab.runs import Run, load_run

RANDOMISED_PASS = 0.5  # Spearman correlation a map must fall below once the top is random
AUC_STEPS = 16  # fractions of the pixels deleted or inserted: 0, 1/16, ..., 1
TASKS = ("classify", "segment", "detect")
# Methods that cannot tell a detector's boxes apart, and why (one line each).
BOX_REFUSALS = {
    "eigencam": "is class-agnostic (the layer's first principal component), so every box"
    " would get the same map",
}
DRAWN_BOXES = 12  # panels in one detection drawing (the highest scores; the JSON has all)


def default_layer(run: Run) -> str:
    """The registry's last convolutional stage of the run's model (``ModelInfo``); for a
    head on a zoo backbone whose registry layer is the backbone (a detector's), the
    backbone's deepest tapped stage (its ``feature_info`` module, e.g. ``layer3`` of a
    ResNet cut at stride 16): the backbone returns a dict of maps, not one map."""
    layer = model_info(run.meta.architecture).explain_layer
    if layer is None:
        raise CnnlabError(
            f"{run.meta.architecture} names no layer to explain by default; pass --layer"
        )
    tapped = getattr(run.model.get_submodule(layer), "feature_modules", None)
    return f"{layer}.{tapped[-1]}" if tapped else layer


@dataclass
class View:
    """Where the model's input lies in the image: (x0, y0, x1, y1) in the image's pixels."""

    box: tuple[float, float, float, float]

    @classmethod
    def of(cls, run: Run, height: int, width: int) -> View:
        if run.task.name != "classify":  # whole image (segment: own size; detect: resized)
            return cls((0.0, 0.0, float(width), float(height)))
        size = run.task.img_size  # shorter side resized to size, then a centred square crop
        short, long = sorted((height, width))
        resized_long = int(size * long / short)
        rh, rw = (size, resized_long) if height <= width else (resized_long, size)
        top, left = round((rh - size) / 2), round((rw - size) / 2)
        sy, sx = height / rh, width / rw
        return cls((left * sx, top * sy, (left + size) * sx, (top + size) * sy))

    def pixel(self, row: int, col: int, shape: Sequence[int]) -> tuple[float, float]:
        """The image (x, y) of the centre of a map cell (row, col) of a (H, W) map."""
        x0, y0, x1, y1 = self.box
        return (
            x0 + (col + 0.5) * (x1 - x0) / shape[1],
            y0 + (row + 0.5) * (y1 - y0) / shape[0],
        )

    def peak(self, heat: Tensor) -> tuple[float, float] | None:
        """The (H, W) map's peak in the image's pixels; None for an all-zero map (a CAM whose
        ReLU left nothing: no peak to point with)."""
        if float(heat.max()) <= 0:
            return None
        row, col = attribution.peak_of(heat)
        return self.pixel(row, col, heat.shape)


@dataclass
class Explanation:
    """One image's map and what it says."""

    file: str | None
    method: str
    layer: str
    class_name: str
    probability: float  # the class's probability (a segmenter's: mean over its region)
    map: Tensor  # (H, W) in [0, 1] over the model's input
    image: Tensor  # uint8 (C, H, W) as read
    view: View
    seconds: float

    def to_dict(self) -> dict:
        peak = self.view.peak(self.map)
        return {
            "file": self.file,
            "method": self.method,
            "layer": self.layer,
            "class": self.class_name,
            "probability": round(self.probability, 6),
            "peak_xy": None if peak is None else [round(v, 2) for v in peak],
            "top10_share": round(attribution.top_share(self.map), 4),
            "map_shape": list(self.map.shape),
            "view_box": [round(v, 2) for v in self.view.box],
            "seconds": round(self.seconds, 4),
        }


def check_run(run: Run) -> None:
    if run.task.name not in TASKS:
        raise CnnlabError(f"{run.path}: explain maps {', '.join(TASKS)} runs, not {run.task.name}")
    refusal = getattr(run.model, "explain_refusal", None)  # a detector that cannot be
    if refusal:
        raise CnnlabError(f"{run.path}: {run.meta.architecture} {refusal}")


def resolve_layer(run: Run, layer: str | None, x: Tensor) -> str:
    """``layer`` (default: the registry's) checked to exist and to output a map."""
    name = layer or default_layer(run)
    attribution.layer_module(run.model, name)
    attribution.check_spatial(run.model, name, x)
    return name


def class_index(run: Run, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in run.classes:
        raise CnnlabError(f"unknown class {class_name!r}; the run knows {', '.join(run.classes)}")
    return run.classes.index(class_name)


def model_input(run: Run, image: Tensor) -> Tensor:
    """(1, C, H, W) on the run's device; an image below the model's minimum size is
    refused (a classifier would enlarge it, inventing the detail it explains)."""
    height, width = image.shape[-2:]
    minimum = getattr(run.model, "min_input_size", 1)
    if min(height, width) < minimum:
        raise CnnlabError(
            f"a {width}x{height} image is below {run.meta.architecture}'s minimum size of"
            f" {minimum}x{minimum}"
        )
    x = run.task.preprocess(image)[None].to(run.device)
    check_input_size(run.model, *x.shape[-2:], "images")
    return x


def target_for(run: Run, x: Tensor, index: int | None) -> tuple[attribution.Target, int, float]:
    """(the scalar to explain, its class, the class's probability) for one input."""
    with torch.no_grad():
        logits = run.model(x).float()
    if run.task.name == "classify":
        probs = logits.softmax(dim=1)[0]
        index = int(probs.argmax()) if index is None else index
        return attribution.class_score(index), index, float(probs[index])
    # A segmenter: the class's logits summed over the region the mask gives it (its largest
    # class other than the first, background, when none is named).
    predicted = logits.argmax(dim=1)[0]  # (H, W)
    if index is None:
        counts = torch.bincount(predicted.flatten(), minlength=logits.shape[1])
        counts[0] = 0 if counts[1:].sum() > 0 else counts[0]
        index = int(counts.argmax())
    region = (predicted == index).float()
    if region.sum() == 0:
        region = torch.ones_like(region)  # no pixel of the class: the whole image
    probs = logits.softmax(dim=1)[0, index]
    probability = float((probs * region).sum() / region.sum())
    chosen = index

    def region_score(output: Tensor) -> Tensor:
        return (output[:, chosen] * region.to(output.device)).sum(dim=(1, 2)) / region.sum()

    return region_score, index, probability


def explain(
    run: Run,
    images: Sequence[Tensor],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    files: Sequence[str | None] | None = None,
    score_threshold: float | None = None,
) -> list[Explanation] | list[BoxesExplanation]:
    """The ``method`` map of each uint8 image (in_channels, H, W) for ``class_name``
    (default: the predicted class) at ``layer`` (default: ``default_layer``); a detection
    run's, one map per box (``explain_boxes``, boxes scoring ``score_threshold`` or more,
    default ``cnnlab predict``'s)."""
    check_run(run)
    if method not in attribution.METHODS:
        raise CnnlabError(
            f"unknown method {method!r}; choose one of {', '.join(attribution.METHODS)}"
        )
    if run.task.name == "detect":
        return explain_boxes(run, images, method, class_name, layer, files, score_threshold)
    if score_threshold is not None:
        raise CnnlabError("a score threshold picks a detector's boxes; this is not a detection run")
    wanted = class_index(run, class_name)
    found = []
    name = None
    for i, image in enumerate(images):
        x = model_input(run, image)
        name = name or resolve_layer(run, layer, x)
        start = time.perf_counter()
        target, index, probability = target_for(run, x, wanted)
        heat = attribution.attribute(run.model, x, target, method, name)[0].cpu()
        seconds = time.perf_counter() - start
        view = View.of(run, *image.shape[-2:])
        file = files[i] if files is not None else None
        found.append(
            Explanation(
                file, method, name, run.classes[index], probability, heat, image, view, seconds
            )
        )
    return found


# ---- detection: one map per box ------------------------------------------------------


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
            heat = attribution.attribute(scorer, x, _column(k), method, module)[0].cpu()
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


def _column(k: int) -> attribution.Target:
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


def explain_files(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    method: str = "gradcam",
    class_name: str | None = None,
    layer: str | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    score_threshold: float | None = None,
) -> list[dict]:
    """``cnnlab explain``: each image file's map (``explain``), drawn to ``OUT/STEM_METHOD.png``
    when ``out`` is given; one document per image (``Explanation.to_dict`` or, for a
    detection run, ``BoxesExplanation.to_dict``, with ``"drawing"``)."""
    run = load_run(run_dir, device, fast=False)
    check_run(run)
    images = [read_image(Path(path), run.task.in_channels) for path in paths]
    files = [str(p) for p in paths]
    results = explain(run, images, method, class_name, layer, files, score_threshold)
    documents = []
    for result in results:
        document = result.to_dict()
        if out is not None:
            target = Path(out) / f"{Path(str(result.file)).stem}_{method}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(result, BoxesExplanation):
                draw_boxes(result, target)
            else:
                draw(result, target)
            document["drawing"] = str(target)
        documents.append(document)
    return documents


def draw(result: Explanation, out: Path) -> None:
    """The map over the image (its view box), with a colour bar and the peak marked."""
    from cnnlab.explain_plots import plot_attribution

    title = f"{result.method} at {result.layer}: {result.class_name} (p={result.probability:.2f})"
    if float(result.map.max()) <= 0:
        title += " (map all zero)"
    plot_attribution(
        result.image, result.map.numpy(), result.view.box, result.view.peak(result.map), title, out
    )


# ---- the audit ---------------------------------------------------------------------------


def cascade(model: nn.Module, layer: str) -> list[tuple[str, list[str]]]:
    """The steps of cascading randomisation, each (what is random, the modules with weights
    random at that step), top first: the head (everything after ``layer``), then the top
    block (the last child of ``layer`` that has a convolution, and what follows it; for a
    layer without weights, the nearest module with weights before it), then a third, two
    thirds and all of the rest."""
    order = [name for name, _ in model.named_modules()]
    weighted = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    inside = [name for name in weighted if name == layer or name.startswith(f"{layer}.")]
    if not inside:  # a layer without weights (a pool or an activation a backbone is cut at):
        # the nearest module with weights before it is its top block.
        before = [name for name in weighted if order.index(name) < order.index(layer)]
        if not before:
            raise CnnlabError(f"layer {layer!r} has no weights to randomise")
        inside = top = [before[-1]]
        top_name = top[0]
    else:
        module = model.get_submodule(layer)
        children = [
            (name, child)
            for name, child in module.named_children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())
        ]
        top_name = f"{layer}.{children[-1][0]}" if children else layer
        first = next(i for i, name in enumerate(inside) if name.startswith(top_name))
        top = inside[first:]
    after = weighted[weighted.index(inside[-1]) + 1 :]
    below = weighted[: weighted.index(top[0])]
    steps = [(f"head ({', '.join(_roots(after)) or 'none'})", after)]
    steps.append((f"+ top block ({top_name})", after + top))
    for share, label in ((1 / 3, "+ a third below"), (2 / 3, "+ two thirds below")):
        cut = len(below) - round(share * len(below))
        steps.append((label, after + top + below[cut:]))
    steps.append(("all", weighted))
    # A step that randomises nothing new (a model with little below its top block) is
    # left out; the first two always stay, the second being the one the check reads.
    kept = steps[:2]
    for step in steps[2:]:
        if len(step[1]) > len(kept[-1][1]):
            kept.append(step)
    return kept


def _roots(names: Sequence[str]) -> list[str]:
    roots: list[str] = []
    for name in names:
        root = name.split(".")[0]
        if root not in roots:
            roots.append(root)
    return roots


def randomised(model: nn.Module, names: Sequence[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose modules ``names`` are re-initialised (their own
    ``reset_parameters``, as at construction; a BatchNorm also forgets its statistics)."""
    copied = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in names:
            module = copied.get_submodule(name)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for parameter in module.parameters(recurse=False):
                    nn.init.normal_(parameter, std=0.01)
    finally:
        torch.random.set_rng_state(generator_state)
    return copied.eval()


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of the flattened values, tied values sharing their mean rank (as
    scipy.stats.rankdata): ranking ties by position would make two maps that are both zero
    over the same pixels agree there by construction."""
    flat = values.flatten().double()
    order = flat.argsort()
    _, group, counts = torch.unique_consecutive(
        flat[order], return_inverse=True, return_counts=True
    )
    last = counts.cumsum(0).double()
    ranks = torch.empty_like(flat)
    ranks[order] = (last - (counts - 1) / 2)[group]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two maps (Pearson's of their average ranks)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


def class_probability(model: nn.Module, index: int) -> Callable[[Tensor], Tensor]:
    """Inputs (N, C, H, W) -> class ``index``'s probability (N,) under a classifier."""

    def probability(batch: Tensor) -> Tensor:
        return model(batch).float().softmax(dim=1)[:, index]

    return probability


def deletion_insertion(
    probability: Callable[[Tensor], Tensor], x: Tensor, heat: Tensor, steps: int = AUC_STEPS
) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) of ``probability`` (inputs (N, C, H, W) -> (N,) in
    [0, 1]: a class's, a box's score) as the pixels of ``x`` (1, C, H, W) are removed (set
    to 0, the mean colour) or inserted into a blurred copy in ``heat``'s order, highest
    first."""
    height, width = x.shape[-2:]
    order = heat.flatten().argsort(descending=True)
    blurred = _blur(x)
    deleted, inserted = [], []
    for step in range(steps + 1):
        count = round(step / steps * order.numel())
        mask = torch.zeros(order.numel(), device=x.device)
        mask[order[:count].to(x.device)] = 1.0
        mask = mask.view(1, 1, height, width)
        deleted.append(x * (1 - mask))
        inserted.append(blurred * (1 - mask) + x * mask)
    with torch.no_grad():
        p_del = probability(torch.cat(deleted)).float()
        p_ins = probability(torch.cat(inserted)).float()
    return float(torch.trapezoid(p_del, dx=1 / steps)), float(torch.trapezoid(p_ins, dx=1 / steps))


def _blur(x: Tensor) -> Tensor:
    side = min(x.shape[-2:])
    kernel = max(3, (side // 8) | 1)
    sigma = kernel / 3
    from torchvision.transforms.v2.functional import gaussian_blur

    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def audit(
    run: Run,
    images: Sequence[Tensor],
    methods: Sequence[str] = attribution.METHODS,
    layer: str | None = None,
    seed: int = 0,
    score_threshold: float | None = None,
) -> dict:
    """Both sanity checks for each method on ``images`` (uint8, the run's channels), for
    each image's predicted class (a detection run: for each box scoring
    ``score_threshold`` or more, default predict's, its score, ``audit_boxes``).
    Segmentation runs are not audited."""
    if run.task.name not in ("classify", "detect"):
        raise CnnlabError(
            f"{run.path}: the audit checks classification and detection runs, not {run.task.name}"
        )
    if not images:
        raise CnnlabError("the audit needs at least one image")
    for method in methods:
        if method not in attribution.METHODS:
            raise CnnlabError(
                f"unknown method {method!r}; choose one of {', '.join(attribution.METHODS)}"
            )
    if run.task.name == "detect":
        return audit_boxes(run, images, methods, layer, seed, score_threshold)
    if score_threshold is not None:
        raise CnnlabError("a score threshold picks a detector's boxes; this is not a detection run")
    x = torch.stack([run.task.preprocess(image) for image in images]).to(run.device)
    name = resolve_layer(run, layer, x)
    with torch.no_grad():
        indices = run.model(x).argmax(dim=1)
    steps = cascade(run.model, name)
    models = [(label, randomised(run.model, names, seed)) for label, names in steps]
    target = attribution.class_scores(indices)
    generator = torch.Generator().manual_seed(seed)
    report: dict = {"layer": name, "images": len(images), "steps": [s[0] for s in steps]}
    rows = []
    for method in methods:
        start = time.perf_counter()
        trained = attribution.attribute(run.model, x, target, method, name)
        seconds = (time.perf_counter() - start) / len(images)
        randomised_maps = [attribution.attribute(m, x, target, method, name) for _, m in models]
        coarse = _native_shape(run.model, name, x, method)
        curves = []
        for i in range(len(images)):
            noise = _random_map(coarse, x.shape[-2:], generator)
            probability = class_probability(run.model, int(indices[i]))
            curves.append(
                deletion_insertion(probability, x[i : i + 1], trained[i])
                + deletion_insertion(probability, x[i : i + 1], noise)
            )
        rows.append(_audit_row(method, trained, randomised_maps, curves, seconds))
    return _audit_report(report, rows)


def audit_boxes(
    run: Run,
    images: Sequence[Tensor],
    methods: Sequence[str] = attribution.METHODS,
    layer: str | None = None,
    seed: int = 0,
    score_threshold: float | None = None,
) -> dict:
    """The audit of a detection run: every box ``cnnlab predict`` finds in ``images`` is
    one explained output, its score (``Detector.scored_detections``); the randomised
    copies read the same boxes' scores (the same proposals or cells), and deletion and
    insertion follow the box's score. Methods that cannot tell boxes apart
    (``BOX_REFUSALS``) are left out."""
    methods = [method for method in methods if method not in BOX_REFUSALS]
    if not methods:
        raise CnnlabError(f"the audit maps boxes with none of {', '.join(BOX_REFUSALS)}")
    limits = box_limits(score_threshold)
    boxes: list[tuple[Tensor, BoxScores, int]] = []  # (input, its boxes' scores, which)
    name = None
    for image in images:
        x = model_input(run, image)
        name = name or resolve_layer(run, layer, x)
        detections, x, scorer = run.task.scored_boxes(run.model, image, run.device, limits)
        boxes += [(x, scorer, k) for k in range(len(detections["scores"]))]
    if not boxes:
        raise CnnlabError(
            f"no box scores {limits.score_threshold} or more in these images: nothing to audit"
        )
    steps = cascade(run.model, name)
    models = [randomised(run.model, names, seed) for _, names in steps]
    generator = torch.Generator().manual_seed(seed)
    report: dict = {
        "layer": name,
        "images": len(images),
        "boxes": len(boxes),
        "steps": [s[0] for s in steps],
    }
    rows = []
    for method in methods:
        start = time.perf_counter()
        trained = _box_maps(boxes, method, name)
        seconds = (time.perf_counter() - start) / len(boxes)
        randomised_maps = [_box_maps(boxes, method, name, model) for model in models]
        coarse = _native_shape(run.model, name, boxes[0][0], method)
        curves = []
        for (x, scorer, k), heat in zip(boxes, trained, strict=True):
            noise = _random_map(coarse, x.shape[-2:], generator)
            score = _column_of(scorer, k)
            curves.append(deletion_insertion(score, x, heat) + deletion_insertion(score, x, noise))
        rows.append(_audit_row(method, trained, randomised_maps, curves, seconds))
    return _audit_report(report, rows)


def _box_maps(
    boxes: Sequence[tuple[Tensor, BoxScores, int]],
    method: str,
    layer: str,
    detector: nn.Module | None = None,
) -> Tensor:
    """Each box's map (B, H, W), its score read from ``detector`` (default: the run's)."""
    maps = []
    for x, scorer, k in boxes:
        if detector is not None:
            scorer = scorer.on(detector)
        module = scorer.detector.get_submodule(layer)
        maps.append(attribution.attribute(scorer, x, _column(k), method, module)[0])
    return torch.stack(maps)


def _column_of(scorer: BoxScores, k: int) -> Callable[[Tensor], Tensor]:
    def score(batch: Tensor) -> Tensor:
        return scorer(batch)[:, k]

    return score


def _random_map(coarse: Sequence[int], size: Sequence[int], generator: torch.Generator) -> Tensor:
    """Uniform noise at a method's own resolution, upsampled as its maps are."""
    noise = torch.rand((1, 1, *coarse), generator=generator)
    return F.interpolate(noise, tuple(size), mode="bilinear")[0, 0]


def _audit_row(
    method: str,
    trained: Tensor,
    randomised_maps: Sequence[Tensor],
    curves: Sequence[tuple[float, float, float, float]],
    seconds: float,
) -> dict:
    """One method's line of the audit: the mean Spearman correlation of the trained maps
    with each randomisation step's, and the mean (deletion, insertion) AUCs of the maps and
    of random ones (``curves``: one (del, ins, random del, random ins) per output)."""
    correlations = [
        sum(spearman(a, b) for a, b in zip(trained, maps, strict=True)) / len(trained)
        for maps in randomised_maps
    ]
    keys = ("deletion", "insertion", "random_deletion", "random_insertion")
    aucs = {key: sum(c[i] for c in curves) / len(curves) for i, key in enumerate(keys)}
    return {
        "method": method,
        "spearman": [round(c, 4) for c in correlations],
        "randomisation_passed": correlations[1] < RANDOMISED_PASS,
        **{key: round(value, 4) for key, value in aucs.items()},
        "faithfulness_passed": aucs["deletion"] < aucs["random_deletion"]
        and aucs["insertion"] > aucs["random_insertion"],
        "ms_per_image": round(seconds * 1000, 2),
    }


def _audit_report(report: dict, rows: list[dict]) -> dict:
    report["methods"] = rows
    report["passed"] = [
        r["method"] for r in rows if r["randomisation_passed"] and r["faithfulness_passed"]
    ]
    return report


def _native_shape(model: nn.Module, layer: str, x: Tensor, method: str) -> tuple[int, int]:
    """The resolution a method's map is made at: the layer's for the CAMs, else the input's."""
    if method in attribution.CAM_METHODS:
        return tuple(attribution.layer_output(model, layer, x[:1]).shape[-2:])
    return tuple(x.shape[-2:])


def audit_table(report: dict) -> str:
    """The audit as text: per method, the correlations down the cascade, the AUCs against
    the random map's, and which checks it passed."""
    steps = report["steps"]
    boxes = f" ({report['boxes']} boxes, each its own output)" if "boxes" in report else ""
    lines = [
        f"Sanity checks on {report['images']} image(s){boxes}, layer {report['layer']}",
        "Spearman correlation with the trained model's map as the weights are randomised:",
    ]
    for i, step in enumerate(steps, 1):
        lines.append(f"  r{i}: {step}")
    header = f"{'method':<10}" + "".join(f"{f'r{i}':>7}" for i in range(1, len(steps) + 1))
    header += f"{'del':>8}{'rand':>7}{'ins':>7}{'rand':>7}  {'random.':<8}{'faithful':<9}ms"
    lines.append(header)
    for row in report["methods"]:
        line = f"{row['method']:<10}" + "".join(f"{c:>7.2f}" for c in row["spearman"])
        line += f"{row['deletion']:>8.3f}{row['random_deletion']:>7.3f}"
        line += f"{row['insertion']:>7.3f}{row['random_insertion']:>7.3f}  "
        line += f"{'pass' if row['randomisation_passed'] else 'FAIL':<8}"
        line += f"{'pass' if row['faithfulness_passed'] else 'FAIL':<9}{row['ms_per_image']:.0f}"
        lines.append(line)
    passed = ", ".join(report["passed"]) or "none"
    lines.append(
        f"Passed both (r2 < {RANDOMISED_PASS} once the top block is random; deletion AUC"
        f" below and insertion AUC above a random map's): {passed}"
    )
    return "\n".join(lines)


def audit_images(run: Run, count: int) -> list[Path]:
    """``count`` images spread evenly over the run's own evaluation split, which lists its
    images class by class (its first ``count`` could all be of one class)."""
    split = run.task.split_images(run.path / "split.json", run.task.eval_split)
    return [split[i * len(split) // count] for i in range(min(count, len(split)))]


def audit_run(
    run_dir: str | Path,
    paths: Sequence[str | Path] = (),
    count: int = 8,
    methods: Sequence[str] = attribution.METHODS,
    layer: str | None = None,
    device: str = "auto",
    score_threshold: float | None = None,
) -> dict:
    """``cnnlab explain RUN --audit``: ``audit`` on the given images, or on
    ``audit_images(run, count)``."""
    run = load_run(run_dir, device, fast=False)
    check_run(run)
    files = [Path(p) for p in paths]
    if not files:
        files = audit_images(run, count)
    images = [read_image(file, run.task.in_channels) for file in files]
    return audit(run, images, methods, layer, score_threshold=score_threshold)
