"""Selective-search proposals: the same boxes every run, the cache beside the data (a
changed image is recomputed), user files, recall, and `cnnlab detect proposals`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.data.images import read_image
from cnnlab.data.proposals import (
    ProposalSource,
    cache_path,
    proposal_report,
    recall,
    selective_search,
)
from cnnlab.data.shapes import write_shapes
from cnnlab.files import sha256_of


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    write_shapes(tmp_path / "shapes", task="detect", n=4, size=64, seed=0)
    return tmp_path / "shapes"


def images_of(folder: Path) -> list[Path]:
    return sorted((folder / "images").iterdir())


def test_selective_search_gives_the_same_boxes_every_time(shapes):
    image = read_image(images_of(shapes)[0], 3)
    first, second = selective_search(image), selective_search(image)
    assert first.shape[1] == 4 and len(first) > 10
    np.testing.assert_array_equal(first, second)
    assert (first[:, 2] > first[:, 0]).all() and (first[:, 3] > first[:, 1]).all()
    assert first[:, 2].max() <= 64 and first[:, 3].max() <= 64
    assert len(selective_search(image, max_boxes=5)) == 5


def test_the_cache_is_reused_and_a_changed_image_recomputed(shapes):
    images = images_of(shapes)
    source = ProposalSource("fast", 50)
    first = source.boxes(images, progress=False)
    cache = cache_path(shapes, "fast", 50)
    stored = json.loads(cache.read_text())
    assert stored["format"] == "cnnlab-proposals" and stored["mode"] == "fast"
    assert set(stored["images"]) == {sha256_of(p) for p in images}
    # A cached entry is what is read back, even if it is not what selective search gives.
    digest = sha256_of(images[1])
    stored["images"][digest]["boxes"] = [[1, 2, 3, 4]]
    cache.write_text(json.dumps(stored))
    assert source.boxes(images, progress=False)[images[1]].tolist() == [[1, 2, 3, 4]]
    # Changing an image's pixels changes its digest: it is computed afresh.
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images[1])
    again = source.boxes(images, progress=False)
    assert again[images[1]].tolist() != [[1, 2, 3, 4]]
    np.testing.assert_array_equal(again[images[0]], first[images[0]])
    # Other settings are another file.
    ProposalSource("fast", 10).boxes(images[:1], progress=False)
    assert cache_path(shapes, "fast", 10).is_file()


def test_two_workers_give_what_one_gives(shapes):
    images = images_of(shapes)
    one = ProposalSource("fast", 100).boxes(images, progress=False)
    for file in (shapes / "proposals").iterdir():
        file.unlink()
    two = ProposalSource("fast", 100, workers=2).boxes(images, progress=False)
    for image in images:
        np.testing.assert_array_equal(one[image], two[image])


def test_a_user_file_is_read_by_digest_or_by_path(shapes, tmp_path):
    images = images_of(shapes)
    entries = {f"images/{p.name}": [[0, 0, 10, 10], [5, 5, 20, 30]] for p in images[1:]}
    entries[sha256_of(images[0])] = {"boxes": [[1, 1, 2, 2]]}
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"images": entries}))
    found = ProposalSource(file=str(file)).boxes(images)
    assert found[images[0]].tolist() == [[1, 1, 2, 2]]
    assert found[images[2]].tolist() == [[0, 0, 10, 10], [5, 5, 20, 30]]
    del entries["images/" + images[3].name]
    file.write_text(json.dumps({"images": entries}))
    with pytest.raises(Exception, match="no proposals for"):
        ProposalSource(file=str(file)).boxes(images)


def test_recall_counts_ground_truth_covered_at_each_iou():
    proposals = [np.array([[0, 0, 10, 10], [20, 20, 30, 31]], np.float32)]
    truth = [[(0, 0, 10, 10), (20, 20, 30, 36), (50, 50, 60, 60)]]  # IoU 1, 0.6875, 0
    assert recall(proposals, truth) == {"recall50": 2 / 3, "recall70": 1 / 3}
    assert recall([np.zeros((0, 4), np.float32)], [[]]) == {"recall50": None, "recall70": None}


def test_the_command_prints_boxes_recall_and_seconds(shapes, capsys):
    assert main(["detect", "proposals", str(shapes), "--max", "200", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 4 and 10 < report["boxes_per_image"] <= 200
    assert report["recall50"] >= report["recall70"] > 0.5
    assert report["seconds_per_image"] > 0
    cached = proposal_report(shapes, ProposalSource("fast", 200))  # read from the cache
    assert cached["seconds_per_image"] < report["seconds_per_image"]
    assert {k: v for k, v in cached.items() if k != "seconds_per_image"} == {
        k: v for k, v in report.items() if k != "seconds_per_image"
    }
    assert main(["detect", "proposals", str(shapes / "nothere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    bad = shapes / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["detect", "proposals", str(shapes), "--file", str(bad)]) == 2
    assert "not a proposal file" in capsys.readouterr().err
