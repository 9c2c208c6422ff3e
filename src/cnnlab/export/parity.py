"""Parity of an exported model with the run's own: the same inputs through both.

Inputs are images of the run's validation split (``split.json``), preprocessed by the
run's task as ``predict`` does, or seeded random images when the run has none; a
segmentation model exported for any size also gets an image of an odd size. Compared:
the largest |difference| of the outputs (logits, or YOLOv1's grid) against ``TOLERANCE``
times the largest |output| (at least 1); the same top-1 class per image or per pixel,
where a different answer counts only when the run's own scores of the two classes differ
by more than that tolerance (a tie within float rounding has no right answer); for a
multi-label classifier, each label's yes or no (its sigmoid score above its threshold),
where a different answer counts only when the run's score lies further than the tolerance
from the threshold; and for
detectors, every detection matched by one of the same class with IoU >= ``MATCH_IOU`` and
a score within ``SCORE_TOLERANCE``, except those within that tolerance of the score
threshold or of the last one kept, which float rounding may put on either side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cnnlab.data.images import read_image
from cnnlab.errors import CnnlabError
from cnnlab.models.detection import EVAL_LIMITS, DetectLimits
from cnnlab.runs import Run
from cnnlab.runtime import ExportedModel

PARITY_IMAGES = 8
TOLERANCE = 1e-4  # relative to the largest |output|, at least 1
MATCH_IOU = 0.99
SCORE_TOLERANCE = 1e-4
ODD_SIZE = (7, 13)  # added to the run's size for the extra segmentation image


def parity_inputs(
    run: Run, count: int, any_size: bool = False, split: str = "val"
) -> tuple[list[Tensor], str]:
    """Up to ``count`` model inputs (C, H, W) of the run's ``split`` (int8 calibrates on
    "train") and where they came from."""
    task, split_file = run.task, run.path / "split.json"
    try:
        if not split_file.is_file():
            raise CnnlabError("the run has no split.json")
        paths = task.split_images(split_file, split)[:count]
        images = [read_image(path, task.in_channels) for path in paths]
        source = f"{len(images)} images of the run's {split} split"
        if not images:
            source = f"random images (the run's {split} split is empty)"
    except CnnlabError as error:  # no split.json, its data folder moved, an unreadable file
        images, source = [], f"random images ({error})"
    if not images:
        generator = torch.Generator().manual_seed(0)
        shape = (task.in_channels, task.img_size, task.img_size)
        images = [
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
            for _ in range(count)
        ]
    if any_size:
        height, width = (task.img_size + extra for extra in ODD_SIZE)
        generator = torch.Generator().manual_seed(1)
        odd = (task.in_channels, height, width)
        images.append(torch.randint(0, 256, odd, dtype=torch.uint8, generator=generator))
        source += f", and a random {height}x{width} one"
    return [task.preprocess(image) for image in images], source


@torch.inference_mode()
def check_parity(run: Run, exported: ExportedModel, count: int = PARITY_IMAGES) -> dict[str, Any]:
    """Run ``count`` inputs through the run's model and the exported one and compare them
    (see the module docstring). Returns the figures, ``passed``, and ``failure`` (why not,
    or None)."""
    metadata = exported.metadata
    any_size = "height" in metadata.get("dynamic", [])
    inputs, source = parity_inputs(run, count, any_size)
    logits = run.task.exported_logits
    if logits == "pixels":  # one image at a time: their sizes differ
        result = _dense([(run.model(x[None]), exported(x[None])) for x in inputs], "pixels")
    elif logits == "labels":  # multi-label: each label's decision at its threshold
        batch = torch.stack(inputs)
        ref, got = run.model(batch), exported(batch)
        result = _dense([(ref, got)], None)
        if "max_abs_diff" in result:
            thresholds = run.meta.thresholds or [0.5] * ref.shape[1]
            decisions = _label_decisions(ref, got, thresholds, result["tolerance"])
            result = {**result, **decisions, "failure": result["failure"] or decisions["failure"]}
    elif logits is not None:
        batch = torch.stack(inputs)
        result = _dense([(run.model(batch), exported(batch))], logits)
    else:  # a detector: its raw graph where that is its forward pass, then its detections
        batch = torch.stack(inputs)
        result = {}
        if run.model.graph_is_forward:
            result = _dense([(run.model(batch), exported(batch))], None)
        found = run.model.detect(batch, EVAL_LIMITS), exported.detect(batch, EVAL_LIMITS)
        matched = _detections(*found, EVAL_LIMITS)
        result = {**result, **matched, "failure": result.get("failure") or matched["failure"]}
    return {"inputs": source, "images": len(inputs), **result, "passed": not result["failure"]}


def _dense(pairs: list[tuple[Tensor, Tensor]], unit: str | None) -> dict[str, Any]:
    """The largest |difference| and, for ``unit`` "images" (rows of (N, K) logits) or
    "pixels" ((N, K, H, W)), the argmax answers that changed."""
    largest = max(ref.abs().max().item() for ref, _ in pairs)
    tolerance = TOLERANCE * max(1.0, largest)
    if any(ref.shape != got.shape for ref, got in pairs):
        shapes = next((tuple(r.shape), tuple(g.shape)) for r, g in pairs if r.shape != g.shape)
        return {"failure": f"output shape {shapes[1]} where the run's model gives {shapes[0]}"}
    difference = max((ref - got).abs().max().item() for ref, got in pairs)
    result: dict[str, Any] = {"max_abs_diff": difference, "tolerance": tolerance}
    failure = None
    if not difference <= tolerance:  # also catches nan
        failure = f"max |output difference| {difference:.3g} > {tolerance:.3g}"
    if unit is not None:
        changed = ties = total = 0
        for ref, got in pairs:
            real, tied = _changed_answers(ref, got, tolerance)
            changed, ties, total = changed + real, ties + tied, total + ref[:, 0].numel()
        key = "top1" if unit == "images" else "mask_pixels"
        result |= {f"{key}_same": total - changed - ties, f"{key}_ties": ties}
        result[f"{key}_total"] = total
        if changed and failure is None:
            failure = f"the top class differs on {changed} of {total} {unit}"
    result["failure"] = failure
    return result


def _label_decisions(
    ref: Tensor, got: Tensor, thresholds: list[float], tolerance: float
) -> dict[str, Any]:
    """Multi-label answers (sigmoid score above the label's threshold) of logits (N, K):
    ``labels_same``, ``labels_ties`` (differing within ``tolerance`` of the threshold),
    ``labels_total`` and ``failure``."""
    limit = torch.tensor(thresholds, dtype=torch.float32)
    mine, theirs = ref.float().sigmoid(), got.float().sigmoid()
    differ = (mine > limit) != (theirs > limit)
    near = (mine - limit).abs() <= tolerance
    real, ties = int((differ & ~near).sum()), int((differ & near).sum())
    total = differ.numel()
    failure = f"the label decisions differ on {real} of {total}" if real else None
    return {
        "labels_same": total - real - ties,
        "labels_ties": ties,
        "labels_total": total,
        "failure": failure,
    }


def _changed_answers(ref: Tensor, got: Tensor, tolerance: float) -> tuple[int, int]:
    """(argmax answers over dim 1 that changed, those that changed within a tie)."""
    mine, theirs = ref.argmax(1, keepdim=True), got.argmax(1, keepdim=True)
    differ = (mine != theirs).squeeze(1)
    gap = (ref.gather(1, mine) - ref.gather(1, theirs)).squeeze(1)  # >= 0
    real = int((differ & (gap > tolerance)).sum())
    return real, int(differ.sum()) - real


def _detections(refs: list[dict], gots: list[dict], limits: DetectLimits) -> dict[str, Any]:
    from torchvision.ops import box_iou

    total = matched = missed = 0
    worst_iou, worst_score = 1.0, 0.0
    for ref, got in zip(refs, gots, strict=True):
        total += len(ref["scores"])
        iou = box_iou(ref["boxes"], got["boxes"])  # (R, G)
        gap = (ref["scores"][:, None] - got["scores"][None]).abs()
        fits = (ref["labels"][:, None] == got["labels"][None]) & (iou >= MATCH_IOU)
        fits &= gap <= SCORE_TOLERANCE
        used = torch.zeros(len(got["scores"]), dtype=torch.bool)
        for i in range(len(ref["scores"])):
            free = (fits[i] & ~used).nonzero().flatten()
            if len(free):
                j = free[iou[i, free].argmax()]
                used[j] = True
                matched += 1
                worst_iou = min(worst_iou, iou[i, j].item())
                worst_score = max(worst_score, gap[i, j].item())
            elif not _borderline(ref["scores"][i], ref["scores"], limits):
                missed += 1
        missed += sum(not _borderline(s, got["scores"], limits) for s in got["scores"][~used])
    failure = f"{missed} of {total} detections unmatched" if missed else None
    return {
        "detections": total,
        "matched": matched,
        "min_iou": worst_iou,
        "max_score_diff": worst_score,
        "failure": failure,
    }


def _borderline(score: Tensor, scores: Tensor, limits: DetectLimits) -> bool:
    """A score that rounding may put on either side of the threshold or of the cap."""
    near = abs(score.item() - limits.score_threshold) <= SCORE_TOLERANCE
    lowest = scores.min().item() + SCORE_TOLERANCE
    capped = len(scores) == limits.max_detections and score.item() <= lowest
    return near or capped
