"""``cnnlab explain RUN --audit``: the sanity checks (``sanity_checks``) run on a run's
images for each method, a classifier's predicted class or each box a detector finds, and
summed up in one row per method (``audit_table``). A method passes the randomisation check
when the correlation is below ``RANDOMISED_PASS`` once the head and the top block are
random, and the faithfulness check when its deletion AUC is below and its insertion AUC
above a random map's."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlab.attribution import maps as attribution
from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.explain.box_maps import BOX_REFUSALS, box_limits, box_score
from cnnlab.explain.inputs import check_run, model_input, resolve_layer
from cnnlab.explain.sanity_checks import (
    cascade,
    class_probability,
    deletion_insertion,
    randomised,
    spearman,
)
from cnnlab.models.detection.contract import BoxScores
from cnnlab.runs import Run, load_run

RANDOMISED_PASS = 0.5  # Spearman correlation a map must fall below once the top is random


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
        maps.append(attribution.attribute(scorer, x, box_score(k), method, module)[0])
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
