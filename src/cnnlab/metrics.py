"""Metrics: classification's in plain torch, average precision and mAP through torchmetrics.

The classification functions take the logits (or scores) of a whole split, shape (N, K),
and the true class indices, shape (N,), and return plain numbers or CPU tensors; they are
torchmetrics' multiclass accuracy, confusion matrix, precision, recall and F1 (micro or
per class, 0 where a ratio is undefined) written out in a few lines of torch, because
importing torchmetrics (which imports scipy.signal and matplotlib.pyplot for its audio
and plotting parts) took longer than the demo's whole evaluation; tests/test_metrics.py
checks them against torchmetrics on random inputs. ``multilabel_report``'s average
precision and ``mean_average_precision`` import torchmetrics when they are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cnnlab.errors import CnnlabError

if TYPE_CHECKING:  # classification imports this module; it needs no detection data
    from cnnlab.data.detect import DetectionSample


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores (0 for no
    samples)."""
    if len(targets) == 0:
        return 0.0
    k = min(k, logits.shape[1])
    top = logits.argmax(dim=1, keepdim=True) if k == 1 else logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class (the highest score)."""
    num_classes = logits.shape[1]
    targets = targets.long()
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < num_classes:
        raise ValueError(f"class indices outside 0..{num_classes - 1} for {num_classes} scores")
    cells = targets * num_classes + logits.argmax(dim=1)
    return torch.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """``{class: {"precision", "recall", "f1", "support"}}``; 0 where a ratio is undefined."""
    confusion = confusion_matrix(logits, targets)
    right = confusion.diagonal().float()
    predicted, support = confusion.sum(dim=0).float(), confusion.sum(dim=1)
    precision = _ratio(right, predicted).tolist()
    recall = _ratio(right, support.float()).tolist()
    f1 = _ratio(2 * right, predicted + support).tolist()
    return {
        name: {"precision": p, "recall": r, "f1": f, "support": s}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support.tolist(), strict=True)
    }


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part / whole`` element by element, 0 where ``whole`` is 0 (torchmetrics' rule)."""
    return torch.where(whole == 0, torch.zeros_like(part), part / whole)


def most_confused(confusion: torch.Tensor, classes: list[str], top: int = 10) -> list[dict]:
    """The most frequent mistakes, as fastai's ``most_confused``: ``[{"true", "pred",
    "count"}]`` for each off-diagonal cell of the (K, K) ``confusion`` (rows true, columns
    predicted) holding at least one image, largest first, at most ``top``."""
    counts = torch.as_tensor(confusion).clone()
    counts.fill_diagonal_(0)
    pairs = [(int(counts[t, p]), t, p) for t, p in counts.nonzero().tolist()]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [{"true": classes[t], "pred": classes[p], "count": n} for n, t, p in pairs[:top]]


def fit_thresholds(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per-label decision thresholds for multi-label scores (N, K) in [0, 1] against 0/1
    ``targets`` (N, K): for each label, the threshold among its scores that maximises its
    F1 (a tie keeps the higher threshold: fewer false alarms), placed midway to the next
    lower score so that a slightly lower score elsewhere is not cut off; 0.5 for a label
    with no positive example (nothing to fit it on)."""
    thresholds = []
    for k in range(scores.shape[1]):
        column, truth = scores[:, k].double(), targets[:, k].bool()
        positives = int(truth.sum())
        if positives == 0:
            thresholds.append(0.5)
            continue
        order = column.argsort(descending=True)
        ranked, hits = column[order], truth[order].double().cumsum(0)
        predicted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
        f1 = 2 * hits / (predicted + positives)  # predict the top i+1 as positive
        # Only a cut between two different scores is a threshold; the last of equal scores.
        distinct = torch.ones(len(ranked), dtype=torch.bool)
        distinct[:-1] = ranked[:-1] != ranked[1:]
        f1[~distinct] = -1.0
        best = int(f1.argmax())  # the first maximum: the highest threshold of the ties
        below = float(ranked[best + 1]) if best + 1 < len(ranked) else 0.0
        thresholds.append((float(ranked[best]) + below) / 2)
    return thresholds


def multilabel_report(
    scores: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """Multi-label metrics of sigmoid ``scores`` (N, K) against 0/1 ``targets`` (N, K):
    ``{"map", "f1", "exact_match", "per_class": {name: {"ap", "precision", "recall",
    "f1", "support", "threshold"}}}``. ``map`` is the macro average precision over the
    labels with a positive example (scikit-learn's ``average_precision_score`` on the same
    scores); ``f1`` the macro F1 and ``exact_match`` the fraction of images whose predicted
    label set (scores above each label's threshold, 0.5 when none is given) is exactly
    the true one. A label without positives has AP None and is left out of ``map``."""
    from torchmetrics.functional.classification import binary_average_precision

    num = len(classes)
    thresholds = thresholds if thresholds is not None else [0.5] * num
    truth = targets.bool()
    predicted = scores > torch.tensor(thresholds, dtype=scores.dtype)
    support = truth.sum(0)
    # AP (torchmetrics' binary AP, label by label) only where a label has positives: it
    # is undefined for the others.
    ap = [
        binary_average_precision(scores[:, k], targets[:, k].long()).item()
        if support[k] > 0
        else None
        for k in range(num)
    ]
    true_pos = (predicted & truth).sum(0).double()
    precision = true_pos / predicted.sum(0).clamp(min=1)
    recall = true_pos / support.clamp(min=1)
    f1 = 2 * true_pos / (predicted.sum(0) + support).clamp(min=1)
    per_class = {
        name: {
            "ap": ap[k],
            "precision": precision[k].item(),
            "recall": recall[k].item(),
            "f1": f1[k].item(),
            "support": int(support[k]),
            "threshold": thresholds[k],
        }
        for k, name in enumerate(classes)
    }
    known = [v["ap"] for v in per_class.values() if v["ap"] is not None]
    return {
        "map": sum(known) / len(known) if known else 0.0,
        "f1": f1.mean().item(),
        "exact_match": (predicted == truth).all(dim=1).double().mean().item(),
        "per_class": per_class,
    }


def mean_average_precision(
    predictions: list[dict[str, Tensor]],
    samples: list[DetectionSample],
    classes: list[str],
    pr_curves: bool = False,
) -> dict[str, Any]:
    """COCO mAP@[.5:.95], mAP@0.5, mAP@0.75 and per-class AP@0.5 of ``predictions``
    against the samples' boxes (torchmetrics, pycocotools backend, up to 100 per image):
    ``{"map", "map50", "map75", "per_class_ap50": {name: ap or None}, "n_images"}``, None
    for a class with no object in the set. With ``pr_curves``, also ``_pr``: per class
    with objects, (recall, precision) at IoU 0.5 as COCO interpolates it (the precision
    at each of 101 recall levels up to the recall reached)."""
    from torchmetrics.detection import MeanAveragePrecision

    if not any(s.boxes for s in samples):
        raise CnnlabError("no annotated objects in the evaluation images")
    # One process scores the whole set; torchmetrics would otherwise wait for the other
    # processes of a torchrun group to send their share at compute().
    common = {
        "box_format": "xyxy",
        "iou_type": "bbox",
        "backend": "pycocotools",
        "sync_on_compute": False,
    }
    coco = MeanAveragePrecision(**common)
    at50 = MeanAveragePrecision(
        **common, iou_thresholds=[0.5], class_metrics=True, extended_summary=pr_curves
    )
    targets = [
        {
            "boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(s.labels, dtype=torch.int64),
        }
        for s in samples
    ]
    for metric in (coco, at50):
        metric.update(predictions, targets)
    result, result50 = coco.compute(), at50.compute()
    per_class: dict[str, float | None] = dict.fromkeys(classes)
    labels = result50["classes"].reshape(-1).tolist()
    for label, ap in zip(labels, result50["map_per_class"].reshape(-1).tolist(), strict=True):
        per_class[classes[label]] = ap if ap >= 0 else None  # -1: no object of this class
    report = {
        "map": result["map"].item(),
        "map50": result["map_50"].item(),
        "map75": result["map_75"].item(),
        "per_class_ap50": per_class,
        "n_images": len(samples),
    }
    if pr_curves:
        # precision: (IoU thresholds, 101 recall levels, classes, areas, max detections);
        # recall: the same without the levels. "all" areas, up to 100 detections.
        levels = torch.linspace(0, 1, 101)
        curves = {}
        for k, label in enumerate(labels):
            reached = float(result50["recall"][0, k, 0, -1])
            if reached < 0:  # no object of this class
                continue
            keep = levels <= reached + 1e-9
            precision = result50["precision"][0, :, k, 0, -1].float().clamp(min=0)
            curves[classes[label]] = (levels[keep].tolist(), precision[keep].tolist())
        report["_pr"] = curves
    return report
