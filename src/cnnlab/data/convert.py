"""``cnnlab data convert SRC DST --to coco|voc|yolo``: a detection folder in any of the three
layouts (``cnnlab.data.detect``) written as another, images copied beside the labels.

What is read is what training reads (boxes clipped to their image, COCO's crowd regions
left out), so a converted folder trains as its source does. A source with ``train/`` and
``val/`` parts (or VOC's ImageSets) keeps its split: ``DST/train`` and ``DST/val``, or
VOC's ImageSets/Main lists. ``DST`` is built in a staging folder and renamed into place
at the end: a failure never leaves a half-written folder, and ``SRC`` is only read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cnnlab.data.detect import DetectionSample, make_detection_splits, read_detection_folder
from cnnlab.data.voc import ANNOTATIONS, IMAGE_SETS, IMAGES, voc_xml
from cnnlab.destinations import require_new_folder, staged_folder
from cnnlab.errors import CnnlabError

FORMATS = ("coco", "voc", "yolo")


def convert_detection(src: Path, dst: Path, to: str) -> dict:
    """Write the detection folder ``src`` into the new folder ``dst`` in format ``to``;
    returns ``{"from", "to", "classes", "images", "boxes"}``."""
    if to not in FORMATS:
        raise CnnlabError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    src, dst = Path(src), require_new_folder(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise CnnlabError(f"{dst}: destination is inside the source folder {src}")
    if (src / "train").is_dir() and (src / "val").is_dir():
        fmt, classes, train = read_detection_folder(src / "train")
        _, val_classes, val = read_detection_folder(src / "val")
        if val_classes != classes:
            raise CnnlabError(f"{src}: train and val have different classes")
        parts = {"train": train, "val": val}
    else:
        fmt, classes, samples = read_detection_folder(src)
        splits = make_detection_splits(src) if fmt == "voc" else None
        if splits is not None and splits.presplit:
            parts = {"train": splits.train, "val": splits.val}
        else:
            parts = {"": samples}
    with staged_folder(dst) as staging:
        if to == "voc":  # one folder, the split as ImageSets lists
            _write_voc(staging, classes, parts)
        else:
            for name, samples in parts.items():
                folder = staging / name if name else staging
                WRITERS[to](folder, classes, samples)
    every = [s for samples in parts.values() for s in samples]
    return {
        "from": fmt,
        "to": to,
        "classes": classes,
        "images": len(every),
        "boxes": sum(len(s.boxes) for s in every),
    }


def _image_names(samples: list[DetectionSample], flat: bool) -> list[str]:
    """Each image's name in the new folder: its path below its own images folder (VOC:
    the file name alone), refused when two images would share one (VOC: one stem)."""
    names, taken = [], {}
    for sample in samples:
        name = sample.path.name if flat else _below_images(sample.path)
        key = Path(name).stem if flat else name
        if key in taken:
            raise CnnlabError(f"{sample.path} and {taken[key]} would share the name {key!r}")
        taken[key] = sample.path
        names.append(name)
    return names


def _below_images(path: Path) -> str:
    for parent in path.parents:
        if parent.name in ("images", IMAGES):
            return path.relative_to(parent).as_posix()
    return path.name


def _copy(sample: DetectionSample, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample.path, target)


def write_coco(folder: Path, classes: list[str], samples: list[DetectionSample]) -> None:
    """``folder/annotations.json`` (bbox x, y, w, h in pixels; category ids from 1) and
    ``folder/images/``."""
    images, annotations = [], []
    for image_id, (sample, name) in enumerate(
        zip(samples, _image_names(samples, flat=False), strict=True), start=1
    ):
        _copy(sample, folder / "images" / name)
        images.append(
            {"id": image_id, "file_name": name, "width": sample.width, "height": sample.height}
        )
        for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "annotations.json").write_text(json.dumps(document, indent=1) + "\n")


def write_yolo(folder: Path, classes: list[str], samples: list[DetectionSample]) -> None:
    """``folder/classes.txt``, ``folder/labels/STEM.txt`` (class cx cy w h, normalised) and
    ``folder/images/``."""
    for sample, name in zip(samples, _image_names(samples, flat=False), strict=True):
        _copy(sample, folder / "images" / name)
        lines = []
        for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels, strict=True):
            w, h = sample.width, sample.height
            values = ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)
            lines.append(f"{label} " + " ".join(f"{v:.6f}" for v in values))
        label_file = (folder / "labels" / name).with_suffix(".txt")
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text("".join(f"{line}\n" for line in lines))
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in classes))


def _write_voc(folder: Path, classes: list[str], parts: dict[str, list[DetectionSample]]) -> None:
    """``Annotations/STEM.xml``, ``JPEGImages/``, ``classes.txt`` (the class order) and,
    for a split source, ``ImageSets/Main/{train,val,trainval}.txt``."""
    every = [s for samples in parts.values() for s in samples]
    names = dict(zip((s.path for s in every), _image_names(every, flat=True), strict=True))
    (folder / ANNOTATIONS).mkdir(parents=True)
    for sample in every:
        name = names[sample.path]
        _copy(sample, folder / IMAGES / name)
        objects = [
            (box, classes[label]) for box, label in zip(sample.boxes, sample.labels, strict=True)
        ]
        xml = voc_xml(name, sample.width, sample.height, objects)
        (folder / ANNOTATIONS / f"{Path(name).stem}.xml").write_bytes(xml)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    if set(parts) == {"train", "val"}:
        (folder / IMAGE_SETS).mkdir(parents=True)
        for part, samples in (*parts.items(), ("trainval", every)):
            stems = "".join(f"{Path(names[s.path]).stem}\n" for s in samples)
            (folder / IMAGE_SETS / f"{part}.txt").write_text(stems)


WRITERS = {"coco": write_coco, "yolo": write_yolo}
