"""cnnlab.metrics' classification figures, written in plain torch, are torchmetrics' own.

The demo's evaluation computes top-1, top-5, the confusion matrix and per-class precision,
recall and F1 without importing torchmetrics (whose import alone took longer than the
evaluation); these checks compare every one of them with torchmetrics' multiclass
functions on random logits, ties in the scores, absent and never-predicted classes and
a split of two classes included.
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from cnnlab import metrics


def random_split(seed: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, k) and targets (n,): half of them near the target class (a trained
    model's), the rest noise; rounded to one decimal so that some scores tie; the last
    class never a target."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, max(k - 1, 1), (n,), generator=generator)
    logits = torch.randn(n, k, generator=generator)
    logits[: n // 2].scatter_add_(1, targets[: n // 2, None], torch.full((n // 2, 1), 2.0))
    return logits.mul(10).round().div(10), targets


@pytest.mark.parametrize(("seed", "n", "k"), [(0, 359, 10), (1, 50, 3), (2, 7, 12), (3, 200, 2)])
def test_classification_figures_equal_torchmetrics(seed: int, n: int, k: int) -> None:
    logits, targets = random_split(seed, n, k)
    for top in (1, 5):
        expected = multiclass_accuracy(
            logits, targets, num_classes=k, top_k=min(top, k), average="micro"
        ).item()
        assert metrics.topk_accuracy(logits, targets, k=top) == expected
    confusion = metrics.confusion_matrix(logits, targets)
    assert confusion.dtype == torch.int64
    assert torch.equal(confusion, multiclass_confusion_matrix(logits, targets, num_classes=k))
    classes = [f"c{i}" for i in range(k)]
    found = metrics.per_class(logits, targets, classes)
    per_class_args = {"num_classes": k, "average": "none"}
    for key, function in (
        ("precision", multiclass_precision),
        ("recall", multiclass_recall),
        ("f1", multiclass_f1_score),
    ):
        expected = function(logits, targets, **per_class_args).tolist()
        assert [found[name][key] for name in classes] == pytest.approx(expected, abs=1e-7), key
    assert [found[name]["support"] for name in classes] == torch.bincount(
        targets, minlength=k
    ).tolist()


def test_an_empty_split_scores_zero() -> None:
    # (torchmetrics raises on no samples: cannot reshape a tensor of 0 elements)
    logits, targets = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    assert metrics.topk_accuracy(logits, targets) == 0.0
    assert torch.equal(metrics.confusion_matrix(logits, targets), torch.zeros(4, 4).long())


def test_a_class_index_past_the_scores_is_refused() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        metrics.confusion_matrix(torch.zeros(2, 3), torch.tensor([0, 3]))
