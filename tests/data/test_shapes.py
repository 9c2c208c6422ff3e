import json

import numpy as np
import pytest
from PIL import Image

from cnnlab.data.shapes import tight_box, write_shapes
from cnnlab.errors import CnnlabError

N, SIZE = 24, 64


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    seg = write_shapes(root / "seg", task="segment", n=N, size=SIZE, seed=3)
    det = write_shapes(root / "det", task="detect", n=N, size=SIZE, seed=3)
    return root, seg, det


def _array(path):
    return np.array(Image.open(path))


def test_segment_layout_and_masks(sets):
    root, summary, _ = sets
    seg = root / "seg"
    assert (seg / "classes.txt").read_text().split() == [
        "background",
        "circle",
        "square",
        "triangle",
    ]
    images = sorted(p.name for p in (seg / "images").iterdir())
    assert images == sorted(p.name for p in (seg / "masks").iterdir())
    assert len(images) == N
    seen = set()
    for name in images:
        image, mask = _array(seg / "images" / name), _array(seg / "masks" / name)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        assert (mask > 0).any() and (mask == 0).any()
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2, 3}
    assert sum(summary["objects"].values()) >= N


def test_shapes_stand_out_from_the_background(sets):
    root, _, _ = sets
    image = _array(root / "seg" / "images" / "00.png").astype(float)
    mask = _array(root / "seg" / "masks" / "00.png")
    for label in np.unique(mask[mask > 0]):
        inside = image[mask == label].mean(axis=0)
        border = image[mask == 0].mean(axis=0)
        assert np.linalg.norm(inside - border) > 20


def test_same_seed_same_files_other_seed_other_files(sets, tmp_path):
    root, _, _ = sets
    write_shapes(tmp_path / "again", n=4, size=SIZE, seed=3)
    write_shapes(tmp_path / "other", n=4, size=SIZE, seed=4)
    for name in ("0.png", "1.png", "2.png", "3.png"):
        first = _array(root / "seg" / "images" / f"0{name}")
        assert np.array_equal(first, _array(tmp_path / "again" / "images" / name))
        assert not np.array_equal(first, _array(tmp_path / "other" / "images" / name))
        assert np.array_equal(
            _array(root / "seg" / "masks" / f"0{name}"),
            _array(tmp_path / "again" / "masks" / name),
        )


def test_detect_coco_fields_and_tight_visible_boxes(sets):
    root, _, summary = sets
    coco = json.loads((root / "det" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert len(coco["images"]) == N
    per_image = {}
    for annotation in coco["annotations"]:
        assert set(annotation) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        per_image.setdefault(annotation["image_id"], []).append(annotation)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert len(coco["annotations"]) == sum(summary["objects"].values())
    for image in coco["images"]:
        assert 1 <= len(per_image[image["id"]]) <= 4
        name = image["file_name"]
        # the detect images are the segment images (same seed): its masks check the boxes
        pixels = _array(root / "det" / "images" / name)
        assert np.array_equal(pixels, _array(root / "seg" / "images" / name))
        mask = _array(root / "seg" / "masks" / name)
        for annotation in per_image[image["id"]]:
            x, y, w, h = annotation["bbox"]
            assert min(x, y) >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert 0.35 * w * h <= annotation["area"] <= w * h
            window = mask[y : y + h, x : x + w]
            # partly covered at most
            assert (window == annotation["category_id"]).sum() >= 0.6 * annotation["area"]
            # tight: each edge of the box touches the shape, or a shape covering it
            for edge in (window[0], window[-1], window[:, 0], window[:, -1]):
                assert (edge != 0).any()


def test_tight_box_uses_pixel_edges():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert tight_box(mask) == [3, 2, 6, 3]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(CnnlabError, match="task"):
        write_shapes(tmp_path, task="classify")
    with pytest.raises(CnnlabError, match="size"):
        write_shapes(tmp_path, size=8)
