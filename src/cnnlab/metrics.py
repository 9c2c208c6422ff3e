"""Classification metrics: a thin layer over torchmetrics' functional API.

Every function takes the logits (or scores) of a whole split, shape (N, K), and the true
class indices, shape (N,), and returns plain numbers or CPU tensors.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores."""
    num_classes = logits.shape[1]
    k = min(k, num_classes)
    return multiclass_accuracy(
        logits, targets, num_classes=num_classes, top_k=k, average="micro"
    ).item()


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K, K) int64 counts; row = true class, column = predicted class."""
    return multiclass_confusion_matrix(logits, targets, num_classes=logits.shape[1])


def per_class(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """``{class: {"precision", "recall", "f1", "support"}}``; 0 where a ratio is undefined."""
    num_classes = len(classes)
    kwargs = {"num_classes": num_classes, "average": "none"}
    precision = multiclass_precision(logits, targets, **kwargs).tolist()
    recall = multiclass_recall(logits, targets, **kwargs).tolist()
    f1 = multiclass_f1_score(logits, targets, **kwargs).tolist()
    support = torch.bincount(targets, minlength=num_classes).tolist()
    return {
        name: {"precision": p, "recall": r, "f1": f, "support": s}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }


def most_confused(confusion: torch.Tensor, classes: list[str], top: int = 10) -> list[dict]:
    """The most frequent mistakes, as fastai's ``most_confused``: ``[{"true", "pred",
    "count"}]`` for each off-diagonal cell of the (K, K) ``confusion`` (rows true, columns
    predicted) holding at least one image, largest first, at most ``top``."""
    counts = torch.as_tensor(confusion).clone()
    counts.fill_diagonal_(0)
    pairs = [(int(counts[t, p]), t, p) for t, p in counts.nonzero().tolist()]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [{"true": classes[t], "pred": classes[p], "count": n} for n, t, p in pairs[:top]]
