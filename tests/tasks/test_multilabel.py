"""Multi-label classification: its metrics against scikit-learn, the thresholds it fits."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from cnnlab import metrics


def _scores_and_targets(n: int = 40, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(n, k, generator=g) > 0.6).long()
    targets[0] = 1  # every label has a positive
    # Informative but imperfect scores, with ties.
    scores = (0.6 * targets + 0.7 * torch.rand(n, k, generator=g)).clamp(0, 1)
    scores = (scores * 10).round() / 10
    return scores, targets


def test_map_equals_sklearn_average_precision() -> None:
    scores, targets = _scores_and_targets()
    classes = ["a", "b", "c", "d"]
    report = metrics.multilabel_report(scores, targets, classes)
    expected = average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    assert report["map"] == pytest.approx(expected, abs=1e-6)
    per_label = average_precision_score(targets.numpy(), scores.numpy(), average=None)
    for name, ap in zip(classes, per_label, strict=True):
        assert report["per_class"][name]["ap"] == pytest.approx(ap, abs=1e-6)


def test_f1_and_exact_match_follow_the_thresholds() -> None:
    scores, targets = _scores_and_targets()
    thresholds = [0.3, 0.5, 0.65, 0.45]
    report = metrics.multilabel_report(scores, targets, list("abcd"), thresholds)
    predicted = (scores > torch.tensor(thresholds)).long().numpy()
    per_label = f1_score(targets.numpy(), predicted, average=None, zero_division=0)
    assert report["f1"] == pytest.approx(per_label.mean(), abs=1e-6)
    assert report["per_class"]["c"]["f1"] == pytest.approx(per_label[2], abs=1e-6)
    exact = (predicted == targets.numpy()).all(axis=1).mean()
    assert report["exact_match"] == pytest.approx(exact)


def test_fitted_thresholds_maximise_each_labels_f1() -> None:
    scores, targets = _scores_and_targets()
    fitted = metrics.fit_thresholds(scores, targets)
    for k, threshold in enumerate(fitted):
        column, truth = scores[:, k].numpy(), targets[:, k].numpy()
        best = max(
            f1_score(truth, column > t, zero_division=0) for t in [-1.0, *sorted(set(column))]
        )
        assert f1_score(truth, column > threshold, zero_division=0) == pytest.approx(best)


def test_a_label_without_positives_keeps_half_and_no_ap() -> None:
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.7], [0.8, 0.4]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    assert metrics.fit_thresholds(scores, targets)[1] == 0.5
    report = metrics.multilabel_report(scores, targets, ["x", "y"])
    assert report["per_class"]["y"]["ap"] is None
    assert report["map"] == pytest.approx(1.0)
