"""COCO and YOLO-txt readers, the seeded split and box-aware transforms."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnlab.data.detect import (
    DetectionDataset,
    DetectionSplits,
    collate_detection,
    make_detection_splits,
    read_coco,
    read_detection_folder,
    read_yolo,
)
from cnnlab.data.shapes import write_shapes
from cnnlab.data.transforms import detect_eval as eval_transform
from cnnlab.data.transforms import detect_train
from cnnlab.errors import CnnlabError

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # identity normalisation keeps pixels readable


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (40, 80, 120)).save(path)


def _coco(folder: Path, annotations: list[dict], width: int = 60, height: int = 40) -> Path:
    _image(folder / "images" / "a.png", width, height)
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": width, "height": height}],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}],
    }
    (folder / "annotations.json").write_text(json.dumps(data))
    return folder


def _yolo(folder: Path, lines: str, width: int = 80, height: int = 40) -> Path:
    _image(folder / "images" / "b.png", width, height)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "labels" / "b.txt").write_text(lines)
    (folder / "classes.txt").write_text("cat\ndog\n")
    return folder


def test_coco_boxes_become_xyxy_pixels_and_classes_follow_category_ids(tmp_path):
    folder = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 4, 4]},
        ],
    )
    classes, samples = read_coco(folder)
    assert classes == ["cat", "dog"]  # sorted by category id: 2, 5
    assert samples[0].path == folder / "images" / "a.png"
    assert samples[0].boxes == ((10.0, 5.0, 30.0, 15.0), (0.0, 0.0, 4.0, 4.0))
    assert samples[0].labels == (1, 0)


def test_coco_clips_outside_boxes_and_drops_zero_area_ones_with_warnings(tmp_path, caplog):
    folder = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [50, -5, 20, 15]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [70, 10, 5, 5]},  # right of it
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [3, 3, 0, 8]},  # zero width
        ],
    )
    with caplog.at_level(logging.WARNING):
        _, samples = read_coco(folder)
    assert samples[0].boxes == ((50.0, 0.0, 60.0, 10.0),)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("clipped" in m for m in messages) == 1
    assert sum("dropped" in m for m in messages) == 2
    assert all("a.png" in m for m in messages)


def test_coco_that_does_not_parse_names_file_and_position(tmp_path):
    _coco(tmp_path, [])
    (tmp_path / "annotations.json").write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(CnnlabError, match=r"annotations\.json: not valid JSON .*line 2 column"):
        read_coco(tmp_path)


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        ({"image_id": 7, "category_id": 5, "bbox": [1, 2, 3]}, "bbox must be"),
        ({"image_id": 99, "category_id": 5, "bbox": [1, 2, 3, 4]}, "unknown image_id 99"),
        ({"image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]}, "unknown category_id 3"),
    ],
)
def test_coco_bad_annotation_names_file_and_index(tmp_path, annotation, problem):
    _coco(tmp_path, [annotation])
    with pytest.raises(CnnlabError, match=rf"annotations\.json: annotation 0.*{problem}"):
        read_coco(tmp_path)


def test_coco_image_missing_on_disk_is_named(tmp_path):
    _coco(tmp_path, [])
    (tmp_path / "images" / "a.png").unlink()
    with pytest.raises(CnnlabError, match=r"annotations\.json: image 'a\.png' \(id 7\) not found"):
        read_coco(tmp_path)


def test_coco_without_required_lists_is_refused(tmp_path):
    _coco(tmp_path, [])
    (tmp_path / "annotations.json").write_text('{"images": []}')
    with pytest.raises(CnnlabError, match="needs the lists"):
        read_coco(tmp_path)


def test_yolo_txt_boxes_are_denormalised_with_the_image_size(tmp_path):
    folder = _yolo(tmp_path, "1 0.5 0.5 0.25 0.5\n\n0 0.125 0.25 0.25 0.5\n")
    classes, samples = read_yolo(folder)
    assert classes == ["cat", "dog"]
    assert samples[0].width == 80 and samples[0].height == 40
    assert samples[0].boxes == ((30.0, 10.0, 50.0, 30.0), (0.0, 0.0, 20.0, 20.0))
    assert samples[0].labels == (1, 0)


def test_yolo_txt_clips_and_drops_with_warnings(tmp_path, caplog):
    folder = _yolo(tmp_path, "0 0.95 0.5 0.2 0.2\n1 1.5 0.5 0.2 0.2\n")
    with caplog.at_level(logging.WARNING):
        _, samples = read_yolo(folder)
    assert samples[0].boxes == ((68.0, 16.0, 80.0, 24.0),)
    messages = [r.getMessage() for r in caplog.records]
    assert any("b.png" in m and "clipped" in m for m in messages)
    assert any("b.png" in m and "dropped" in m for m in messages)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n", r"b\.txt:2: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.2 0.2\n\n1 0.5 x 0.2 0.2\n", r"b\.txt:3: not numbers"),
        ("2 0.5 0.5 0.2 0.2\n", r"b\.txt:1: class 2 is not in classes\.txt"),
    ],
)
def test_yolo_txt_errors_give_the_line_number(tmp_path, lines, problem):
    _yolo(tmp_path, lines)
    with pytest.raises(CnnlabError, match=problem):
        read_yolo(tmp_path)


def test_folder_without_annotations_is_a_clear_error(tmp_path):
    _image(tmp_path / "images" / "a.png", 8, 8)
    with pytest.raises(CnnlabError, match=r"no annotations\.json"):
        read_detection_folder(tmp_path)


def test_split_is_seeded_recorded_and_rebuilt(tmp_path):
    write_shapes(tmp_path, task="detect", n=10, size=32, seed=1)
    first = make_detection_splits(tmp_path, val_split=0.3, seed=4)
    again = make_detection_splits(tmp_path, val_split=0.3, seed=4)
    other = make_detection_splits(tmp_path, val_split=0.3, seed=5)
    assert len(first.val) == 3 and len(first.train) == 7
    assert [s.path for s in first.val] == [s.path for s in again.val]
    assert [s.path for s in first.val] != [s.path for s in other.val]
    saved = tmp_path / "split.json"
    saved.write_text(json.dumps(first.to_json()))
    rebuilt = DetectionSplits.from_json(saved)
    assert rebuilt.val == first.val and rebuilt.train == first.train
    assert rebuilt.classes == ["circle", "square", "triangle"]


def test_train_and_val_folders_are_used_as_given(tmp_path):
    write_shapes(tmp_path / "train", task="detect", n=4, size=32)
    write_shapes(tmp_path / "val", task="detect", n=2, size=32, seed=3)
    splits = make_detection_splits(tmp_path)
    assert splits.presplit and len(splits.train) == 4 and len(splits.val) == 2


def test_eval_transform_scales_boxes_with_the_image(tmp_path):
    folder = _coco(tmp_path, [{"image_id": 7, "category_id": 5, "bbox": [12, 4, 24, 8]}])
    _, samples = read_coco(folder)
    image, target = DetectionDataset(samples, eval_transform(30, MEAN, STD))[0]
    assert image.shape == (3, 30, 30) and image.dtype == torch.float32
    # 60x40 -> 30x30: x halves, y shrinks by 3/4
    torch.testing.assert_close(target["boxes"], torch.tensor([[6.0, 3.0, 18.0, 9.0]]))
    assert target["size"].tolist() == [40, 60]


def test_training_augmentation_moves_boxes_with_the_pixels(tmp_path):
    # A white square on black: wherever flip and scale jitter put it, its box must follow.
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (10, 20, 30, 40))
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 20, 20, 20]}],
        "categories": [{"id": 1, "name": "square"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    _, samples = read_coco(tmp_path)
    transform = detect_train(64, "light", True, MEAN, STD)
    dataset = DetectionDataset(samples, transform)
    torch.manual_seed(0)
    for _ in range(8):
        pixels, target = dataset[0]
        if len(target["boxes"]) == 0:  # translated out of the image: dropped with its box
            continue
        x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()
        gray = pixels.mean(0)  # (H, W); after colour jitter the square is still the brightest
        bright = gray > 0.8 * gray.max()
        rows, cols = bright.nonzero(as_tuple=True)
        assert abs(cols.min() - x1) <= 2 and abs(cols.max() + 1 - x2) <= 2
        assert abs(rows.min() - y1) <= 2 and abs(rows.max() + 1 - y2) <= 2


def test_collate_stacks_images_and_keeps_targets_per_image(tmp_path):
    write_shapes(tmp_path, task="detect", n=3, size=32)
    _, _, samples = read_detection_folder(tmp_path)
    images, targets = collate_detection(
        [DetectionDataset(samples, eval_transform(32, MEAN, STD))[i] for i in range(3)]
    )
    assert images.shape == (3, 3, 32, 32)
    assert [len(t["boxes"]) for t in targets] == [len(s.boxes) for s in samples]
