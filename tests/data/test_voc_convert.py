"""Pascal VOC beside COCO and YOLO txt: parsed with entities refused, its ImageSets split
kept, and ``cnnlab data convert`` between the three keeping boxes and classes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cnnlab.data.convert import convert_detection
from cnnlab.data.detect import make_detection_splits, read_detection_folder
from cnnlab.data.voc import read_voc
from cnnlab.errors import CnnlabError
from tests.conftest import run_cli


def _by_name(samples: list) -> dict:
    return {s.path.name: s for s in samples}


def test_coco_to_voc_to_yolo_to_coco_keeps_boxes_and_classes(
    shapes_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source = shapes_dir("detect", 6, 64)
    formats = []
    previous = source
    for step, to in enumerate(("voc", "yolo", "coco")):
        target = tmp_path / f"{step}-{to}"
        report = convert_detection(previous, target, to)
        formats.append((report["from"], report["to"]))
        previous = target
    assert formats == [("coco", "voc"), ("voc", "yolo"), ("yolo", "coco")]
    fmt, classes, original = read_detection_folder(source)
    end_fmt, end_classes, final = read_detection_folder(previous)
    assert (fmt, end_fmt, end_classes) == ("coco", "coco", classes)
    original, final = _by_name(original), _by_name(final)
    assert sorted(original) == sorted(final)
    assert sum(len(s.boxes) for s in original.values()) > 6
    for name, sample in original.items():
        again = final[name]
        assert (again.width, again.height, again.labels) == (
            sample.width,
            sample.height,
            sample.labels,
        )
        for box, other in zip(sample.boxes, again.boxes, strict=True):
            assert max(abs(a - b) for a, b in zip(box, other, strict=True)) <= 0.5


def _voc_folder(root: Path, xml: str, stem: str = "a") -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / f"{stem}.png").write_bytes(b"not read while parsing")
    (root / "Annotations" / f"{stem}.xml").write_text(xml)
    return root


VOC_OBJECT = (
    "<annotation><filename>{stem}.png</filename><size><width>64</width><height>48</height>"
    "<depth>3</depth></size><object><name>{name}</name><bndbox><xmin>11</xmin><ymin>6</ymin>"
    "<xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>"
)


def test_voc_boxes_count_from_one_and_imagesets_fix_the_split(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _voc_folder(root, VOC_OBJECT.format(stem="a", name="dog"))
    (root / "Annotations" / "b.xml").write_text(VOC_OBJECT.format(stem="b", name="cat"))
    (root / "JPEGImages" / "b.png").write_bytes(b"x")
    classes, images = read_voc(root)
    assert classes == ["cat", "dog"]
    assert images[0][1:] == (64, 48, [((10.0, 5.0, 30.0, 40.0), "dog")])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("b\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    splits = make_detection_splits(root)
    assert splits.presplit and splits.format == "voc"
    assert [s.path.name for s in splits.train] == ["b.png"]
    assert [s.path.name for s in splits.val] == ["a.png"]


BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>&lol3;</filename></annotation>
"""
EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<annotation><filename>&secret;</filename></annotation>
"""


@pytest.mark.parametrize("xml", [BOMB, EXTERNAL], ids=["entity-bomb", "external-entity"])
def test_xml_entities_are_refused_in_one_line(tmp_path: Path, xml: str) -> None:
    source = _voc_folder(tmp_path / "voc", xml)
    result = run_cli("data", "convert", source, tmp_path / "out", "--to", "coco")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {source / 'Annotations' / 'a.xml'}: refused: the XML")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CnnlabError, match="declares entities"):
        read_voc(source)
