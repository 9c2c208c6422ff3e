"""Cross-validation (``cnnlab cv``): stratified, disjoint folds around a held-out test
split, a run per fold, the spread between them, and a resume that keeps finished folds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cnnlab.cv import cross_validate, resume_cv
from cnnlab.data.classify import make_folds, make_splits
from cnnlab.errors import CnnlabError
from tests.conftest import run_cli_here, tiny_config


def test_folds_are_stratified_disjoint_and_keep_the_test_split(few_digits: Path) -> None:
    splits = make_splits(few_digits, 0.1, 0.1, seed=5)
    folds = make_folds(splits, 5)
    pool = sorted(splits.train + splits.val)
    vals = [fold.val for fold in folds]
    # Every image outside the test split validates in exactly one fold and trains in the
    # other four; the test split is the same held-out set in all.
    assert sorted(s for val in vals for s in val) == pool
    for fold in folds:
        assert sorted(fold.train + fold.val) == pool
        assert not set(fold.train) & set(fold.val)
        assert fold.test == splits.test
        assert not set(fold.test) & set(fold.val + fold.train)
    # Stratified: each class's images spread over the folds within one of each other.
    for label in range(len(splits.classes)):
        per_fold = [sum(1 for _, lab in val if lab == label) for val in vals]
        assert max(per_fold) - min(per_fold) <= 1
    sizes = [len(val) for val in vals]
    assert max(sizes) - min(sizes) <= 1
    # The same seed deals the same folds; another seed others.
    assert [f.val for f in make_folds(make_splits(few_digits, 0.1, 0.1, seed=5), 5)] == vals
    assert [f.val for f in make_folds(make_splits(few_digits, 0.1, 0.1, seed=6), 5)] != vals


def test_a_class_smaller_than_the_folds_is_refused(few_digits: Path) -> None:
    splits = make_splits(few_digits, 0.1, 0.1, seed=0)
    with pytest.raises(CnnlabError, match=r"class '0' has 36 image.*100 folds"):
        make_folds(splits, 100)


def test_cross_validation_reports_each_fold_and_resumes(few_digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    cfg = tiny_config(few_digits, out, epochs=1, model_args={"cdims": [4], "hdims": [8]})
    summary = cross_validate(cfg, 2, say=lambda line: None)
    saved = json.loads((out / "cv.json").read_text())
    assert saved == summary
    assert [row["fold"] for row in summary["per_fold"]] == [1, 2]
    assert summary["scored_on"] == "test"
    for key in ("top1", "macro_f1", "loss"):
        values = [row[key] for row in summary["per_fold"]]
        assert summary["mean"][key] == pytest.approx(statistics.fmean(values))
        assert summary["std"][key] == pytest.approx(statistics.stdev(values))
    # Each fold scores the same 12 held-out test images: the summed matrix holds both.
    assert all(row["n"] == 12 for row in summary["per_fold"])
    assert sum(map(sum, summary["confusion"])) == 24
    assert (out / "confusion.png").is_file()
    for i in (1, 2):
        split = json.loads((out / f"fold-{i}" / "split.json").read_text())
        assert split == json.loads((out / "splits" / f"fold-{i}.json").read_text())

    # An interruption in fold 2: resume keeps fold 1 as it was and finishes fold 2.
    kept = (out / "fold-1" / "best.safetensors").stat().st_mtime_ns
    (out / "fold-2" / "report.json").unlink()
    (out / "cv.json").unlink()
    said: list[str] = []
    again = resume_cv(out, say=said.append)
    assert said[0].startswith("fold 1/2: done before") and "resuming" in said[1]
    assert (out / "fold-1" / "best.safetensors").stat().st_mtime_ns == kept
    assert again["per_fold"] == summary["per_fold"]


def test_cv_command_refuses_a_used_folder_in_one_line(
    few_digits: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    result = run_cli_here(capsys, "cv", few_digits, "--folds", "3", "--out", tmp_path / "used")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'used'}: --out takes a new or empty folder (continue with --resume)"
    ]
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_a_label_csv_is_read_with_its_images_folder(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cnnlab cv labels.csv --images DIR` splits the CSV's files as found in DIR (its
    --images was once left out of the split, which then looked beside the CSV)."""
    import cnnlab.cv

    rows = [
        f"{p.relative_to(few_digits)},{p.parent.name}" for p in sorted(few_digits.rglob("*.png"))
    ]
    table = tmp_path / "labels" / "digits.csv"
    table.parent.mkdir()
    table.write_text("file,label\n" + "\n".join(rows) + "\n")
    monkeypatch.setattr(cnnlab.cv, "_run_folds", lambda out, say: {})  # the folds: no training
    cross_validate(tiny_config(table, tmp_path / "cv", images=str(few_digits)), 2)
    fold = json.loads((tmp_path / "cv" / "splits" / "fold-1.json").read_text())
    assert Path(fold["root"]) == few_digits.absolute()
