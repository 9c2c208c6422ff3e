"""Multi-label classification: its metrics against scikit-learn, the thresholds it fits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from cnnlab import load_run, metrics
from cnnlab.data.classify import make_splits
from cnnlab.data.labels import read_label_csv
from cnnlab.errors import CnnlabError
from cnnlab.export import export_run
from cnnlab.runtime import read_metadata
from cnnlab.training import train
from tests.conftest import tiny_config


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


PARITY = {"0": "even", "1": "odd", "2": "even"}
NAMES = {"0": "zero", "1": "one", "2": "two"}


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory, few_digits: Path) -> Path:
    """A multi-label labels.csv beside its images: each digit tagged with its name and its
    parity ("zero;even"), every fifth image with its name only."""
    root = tmp_path_factory.mktemp("multilabel")
    rows = ["file,label"]
    for digit, name in NAMES.items():
        for j, path in enumerate(sorted((few_digits / digit).iterdir())):
            shutil.copy(path, root / f"{digit}_{path.name}")
            label = name if j % 5 == 0 else f"{name};{PARITY[digit]}"
            rows.append(f"{digit}_{path.name},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_a_csv_cell_with_several_labels_reads_multi_label(tagged: Path) -> None:
    _, classes, samples = read_label_csv(tagged)
    assert classes == ["even", "odd", "one", "two", "zero"]
    assert all(isinstance(label, tuple) for _, label in samples)
    assert sum(len(label) == 2 for _, label in samples) == 96
    splits = make_splits(tagged, 0.1, 0.1, seed=0)
    assert splits.multi_label
    # Stratified on each image's rarest label: every label reaches val and test.
    for part in (splits.val, splits.test):
        assert {one for _, label in part for one in label} == set(range(5))
    assert sorted(splits.train + splits.val + splits.test) == samples


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tagged: Path) -> tuple[Path, dict]:
    """(run folder, its report) of a tiny convnet trained on ``tagged`` for two epochs."""
    out = tmp_path_factory.mktemp("multilabel-run") / "run"
    cfg = tiny_config(tagged, out, epochs=2, model_args={"cdims": [8], "hdims": [16]})
    return out, train(cfg)


def test_multi_label_training_eval_predict(tagged: Path, trained: tuple[Path, dict]) -> None:
    out, report = trained
    assert report["split"] == "test" and report["n"] == 12
    assert set(report) >= {"map", "f1", "exact_match", "loss", "per_class"}
    assert 0 <= report["map"] <= 1 and (out / "per_class.png").is_file()
    assert not (out / "confusion.png").exists()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "val_map" in header and "train_exact_match" in header
    thresholds = json.loads((out / "model.json").read_text())["thresholds"]
    assert len(thresholds) == 5 and thresholds != [0.5] * 5
    run = load_run(out)
    assert run.task.thresholds == thresholds
    # The same figures from the finished run, at the saved thresholds.
    again = run.evaluate()
    assert again["map"] == pytest.approx(report["map"], abs=1e-6)
    assert again["exact_match"] == pytest.approx(report["exact_match"])
    image = sorted(tagged.parent.glob("*.png"))[0]
    result = run.predict([image])[0]
    listed = [(label["class"], label["prob"] > label["threshold"]) for label in result["labels"]]
    assert all(above for _, above in listed)
    scores = {top["class"]: top["prob"] for top in result["top"]}
    above = {n for n, t in zip(run.task.classes, thresholds, strict=True) if scores[n] > t}
    assert {name for name, _ in listed} == above


def test_export_checks_each_labels_decision(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    record = export_run(out, "onnx", out=tmp_path / "model.onnx")
    parity = record["parity"]
    assert parity["passed"] and parity["labels_total"] == parity["images"] * 5
    assert parity["labels_same"] + parity["labels_ties"] == parity["labels_total"]
    thresholds = json.loads((out / "model.json").read_text())["thresholds"]
    assert read_metadata(tmp_path / "model.onnx")["thresholds"] == thresholds


def test_serve_answers_with_the_labels_above_their_thresholds(
    trained: tuple[Path, dict], tagged: Path
) -> None:
    from fastapi.testclient import TestClient

    from cnnlab.serve.app import create_app

    out, _ = trained
    image = sorted(tagged.parent.glob("*.png"))[3]
    expected = load_run(out).predict([image])[0]
    with TestClient(create_app([out], device="cpu"), base_url="http://127.0.0.1") as client:
        run = client.get("/api/runs").json()["runs"][0]
        assert "per_class" in client.get(f"/api/runs/{run['id']}").json()["figures"]
        files = {"file": ("x.png", image.read_bytes(), "image/png")}
        answer = client.post("/api/predict", files=files)
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert [label["class"] for label in served["labels"]] == [
        label["class"] for label in expected["labels"]
    ]


def test_check_and_cv_say_they_take_one_label_per_image(tagged: Path, tmp_path: Path) -> None:
    from cnnlab.cv import cross_validate
    from cnnlab.data.check import check_folder

    with pytest.raises(CnnlabError, match="multi-label CSV"):
        check_folder(tagged)
    with pytest.raises(CnnlabError, match="single-label classification only"):
        cross_validate(tiny_config(tagged, tmp_path / "cv"), 2)
