"""Labels from a CSV file (``file,label`` rows): read with each error named by its line, and
the same check, clean, split, training, evaluation and prediction as class folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cnnlab import load_run
from cnnlab.data.check import check_folder, clean_folder
from cnnlab.data.classify import make_splits
from cnnlab.data.labels import read_label_csv
from cnnlab.errors import CnnlabError
from cnnlab.training import train
from tests.conftest import run_cli_here, tiny_config

NAMES = {"0": "zero", "1": "one", "2": "two"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, few_digits: Path) -> tuple[Path, Path]:
    """(labels.csv, its images folder): few_digits' files flat in one folder, their class
    named only by the CSV."""
    root = tmp_path_factory.mktemp("csv")
    images = root / "photos"
    images.mkdir()
    rows = ["file,label"]
    for digit, name in NAMES.items():
        for path in sorted((few_digits / digit).iterdir()):
            shutil.copy(path, images / f"{digit}_{path.name}")
            rows.append(f"{digit}_{path.name},{name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv", images


def test_a_label_csv_reads_as_class_folders_do(labelled: tuple[Path, Path]) -> None:
    table, images = labelled
    root, classes, samples = read_label_csv(table, images)
    assert (root, classes, len(samples)) == (images.absolute(), ["one", "two", "zero"], 120)
    splits = make_splits(table, 0.1, 0.1, seed=0, images=images)
    # Stratified as folders are: 4 val and 4 test images of each of the three classes.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (96, 12, 12)
    assert splits.root == images.absolute()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("filename,label\na.png,cat\n", "line 1: unknown column 'filename'"),
        ("file\na.png\n", "line 1: no 'label' column"),
        ("file,label\na.png,cat\nb.png,\n", "line 3: empty label for 'b.png'"),
        ("file,label\na.png,cat\n\nmissing.png,dog\n", "line 4: no file 'missing.png'"),
        ("file,label\na.png,cat\n../a.png,dog\n", "line 3: '../a.png' is not a path inside"),
        ("file,label\na.png,cat\nnotes.txt,dog\n", "line 3: 'notes.txt' is not an image file"),
        ("file,label\na.png,cat\na.png,dog\n", "line 3: 'a.png' is listed again (first on"),
        ("file,label\na.png,cat,extra\n", "line 2: 3 fields, the header has 2"),
    ],
)
def test_csv_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "a.png").write_bytes(b"not read here")
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(CnnlabError) as error:
        read_label_csv(tmp_path / "labels.csv")
    assert str(error.value).startswith(f"{tmp_path / 'labels.csv'} {message}")


def test_check_and_clean_take_a_csv(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    table, images = labelled
    report = check_folder(table, images)
    assert report["layout"] == "csv"
    assert report["classes"] == {"one": 40, "two": 40, "zero": 40}
    cleaned = clean_folder(table, tmp_path / "clean", images=images)
    assert cleaned["classes"] == {"one": 40, "two": 40, "zero": 40}
    assert sorted(p.name for p in (tmp_path / "clean").iterdir() if p.is_dir()) == [
        "one",
        "two",
        "zero",
    ]


def test_train_eval_and_predict_from_a_csv(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    table, images = labelled
    out = tmp_path / "run"
    cfg = tiny_config(
        table, out, images=str(images), epochs=1, model_args={"cdims": [4], "hdims": [8]}
    )
    report = train(cfg)
    assert report["split"] == "test" and report["n"] == 12
    split = json.loads((out / "split.json").read_text())
    assert split["root"] == str(images.absolute()) and split["classes"] == ["one", "two", "zero"]
    run = load_run(out)
    # A CSV as an evaluation set (its files relative to its own folder), and a prediction
    # naming the CSV's classes.
    rows = table.read_text().splitlines()
    listed = [rows[0], *(f"{images.name}/{row}" for row in rows[1::10])]
    (table.parent / "some.csv").write_text("\n".join(listed) + "\n")
    assert run.evaluate(table.parent / "some.csv")["n"] == 12
    result = run.predict([images / sorted(p.name for p in images.iterdir())[0]])[0]
    assert {top["class"] for top in result["top"]} == {"one", "two", "zero"}


def test_train_command_names_the_csv_line(
    labelled: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    table, images = labelled
    broken = tmp_path / "broken.csv"
    broken.write_text(table.read_text() + "gone.png,zero\n")
    result = run_cli_here(capsys, "train", broken, "--images", images, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {broken} line 122: no file 'gone.png' in {images.absolute()}"
    ]
    assert not (tmp_path / "run").exists()
