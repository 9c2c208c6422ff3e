"""Object-detection data: COCO and YOLO-txt folders, their split, the dataset and batching
(the box-aware transforms are in ``cnnlab.data.transforms``).

Two on-disk layouts are read, both with the images under ``DIR/images/``:

* COCO: ``DIR/annotations.json`` with ``images``, ``annotations`` (``bbox`` = x, y, w, h in
  pixels) and ``categories``; classes are the categories sorted by id.
* YOLO txt: ``DIR/labels/STEM.txt`` per image, one ``class cx cy w h`` line per object
  (normalised to 0..1), and ``DIR/classes.txt`` with one class name per line; an image
  without a label file has no objects.
* Pascal VOC (``cnnlab.data.voc``): ``DIR/Annotations/*.xml`` beside ``DIR/JPEGImages/``;
  ``ImageSets/Main/train.txt`` and ``val.txt`` give a fixed split.

``cnnlab data convert`` (``cnnlab.data.convert``) writes any of the three as another.

Everywhere in cnnlab a box is ``[x1, y1, x2, y2]`` in pixels of its image and a label is
the 0-based index of its class (no background class). ``DIR/train`` and ``DIR/val`` in
either layout give a fixed split; otherwise a seeded random split is made and recorded in
``RUN/split.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from cnnlab.data.images import image_size, read_image
from cnnlab.data.listing import walk_files
from cnnlab.data.splits import read_split_file, split_items
from cnnlab.data.voc import is_voc_folder, read_voc, voc_image_sets
from cnnlab.errors import CnnlabError
from cnnlab.files import read_json, read_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionSample:
    """One image and its objects, boxes in the image's own pixels."""

    path: Path
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # (x1, y1, x2, y2) each
    labels: tuple[int, ...]  # 0-based class index per box


@dataclass
class DetectionSplits:
    """The classes and the train/val images of a detection folder."""

    root: Path
    format: str  # "coco" or "yolo"
    classes: list[str]
    train: list[DetectionSample]
    val: list[DetectionSample]
    seed: int
    val_split: float
    presplit: bool

    def to_json(self) -> dict:
        """Which files went where, paths relative to ``root`` (for ``RUN/split.json``)."""
        return {
            "root": str(self.root),
            "format": self.format,
            "classes": self.classes,
            "seed": self.seed,
            "val_split": self.val_split,
            "presplit": self.presplit,
            "train": [_relative(s.path, self.root) for s in self.train],
            "val": [_relative(s.path, self.root) for s in self.val],
        }

    @classmethod
    def from_json(cls, path: Path) -> DetectionSplits:
        """Re-read the annotations and rebuild the split a run saved in ``path``."""
        data, root = read_split_file(path)
        try:
            splits = make_detection_splits(root, float(data["val_split"]), int(data["seed"]))
            by_path = {_relative(s.path, root): s for s in splits.train + splits.val}
            recorded = {name: list(data[name]) for name in ("train", "val")}
        except (KeyError, TypeError, ValueError) as error:
            raise CnnlabError(f"{path}: not a cnnlab split file ({error})") from None
        for name, files in recorded.items():
            missing = [f for f in files if not isinstance(f, str) or f not in by_path]
            if missing:
                raise CnnlabError(f"{path}: {missing[0]!r} is no longer in the data at {root}")
            setattr(splits, name, [by_path[f] for f in files])
        return splits


def make_detection_splits(root: Path, val_split: float = 0.2, seed: int = 0) -> DetectionSplits:
    """``root/train`` + ``root/val`` when both exist, else a seeded split of ``root``."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        fmt, classes, train = read_detection_folder(root / "train")
        _, val_classes, val = read_detection_folder(root / "val")
        if val_classes != classes:
            raise CnnlabError(f"{root}: train and val have different classes")
        return DetectionSplits(root, fmt, classes, train, val, seed, val_split, True)
    fmt, classes, samples = read_detection_folder(root)
    sets = voc_image_sets(root) if fmt == "voc" else None
    if sets is not None:  # VOC's own split, by file stem
        by_stem = {s.path.stem: s for s in samples}
        for name, stems in sets.items():
            missing = [stem for stem in stems if stem not in by_stem]
            if missing:
                raise CnnlabError(
                    f"{root}: ImageSets/Main/{name}.txt lists {missing[0]!r}, not annotated"
                )
        train, val = ([by_stem[stem] for stem in sets[name]] for name in ("train", "val"))
        return DetectionSplits(root, fmt, classes, train, val, seed, val_split, True)
    train, val, _ = split_items(
        samples, val_split, 0.0, seed, key=lambda s: str(s.path), name=str(root / "images")
    )
    return DetectionSplits(root, fmt, classes, train, val, seed, val_split, False)


def read_detection_folder(folder: Path) -> tuple[str, list[str], list[DetectionSample]]:
    """(format, classes, samples) of a COCO or YOLO-txt folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CnnlabError(f"{folder}: no such folder")
    if (folder / "annotations.json").is_file():
        return ("coco", *read_coco(folder))
    if (folder / "labels").is_dir() and (folder / "classes.txt").is_file():
        return ("yolo", *read_yolo(folder))
    if is_voc_folder(folder):
        return ("voc", *read_voc_folder(folder))
    raise CnnlabError(
        f"{folder}: no annotations.json (COCO), labels/ and classes.txt (YOLO txt) or"
        " Annotations/ and JPEGImages/ (Pascal VOC) found"
    )


def read_voc_folder(folder: Path) -> tuple[list[str], list[DetectionSample]]:
    """Classes and samples of a Pascal VOC folder (``cnnlab.data.voc.read_voc``)."""
    classes, images = read_voc(folder)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, width, height, objects in images:
        boxes, labels = [], []
        for box, name in objects:
            clipped = _clip_box(path, box, width, height)
            if clipped is not None:
                boxes.append(clipped)
                labels.append(index[name])
        samples.append(DetectionSample(path, width, height, tuple(boxes), tuple(labels)))
    return classes, samples


def read_coco(folder: Path) -> tuple[list[str], list[DetectionSample]]:
    """Classes (categories sorted by id) and samples of ``folder/annotations.json``."""
    path = Path(folder) / "annotations.json"
    data = read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise CnnlabError(f"{path}: needs the lists 'images', 'annotations' and 'categories'")
    categories = _coco_entries(path, data["categories"], "category", ("id", "name"))
    for category in categories:
        if not isinstance(category["name"], str) or not category["name"]:
            raise CnnlabError(
                f"{path}: category {_shown(category['id'])} has name"
                f" {_shown(category['name'])}, not a non-empty string"
            )
    categories.sort(key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    classes = [c["name"] for c in categories]
    images = {
        im["id"]: (im["file_name"], im.get("width"), im.get("height"))
        for im in _coco_entries(path, data["images"], "image", ("id", "file_name"))
    }
    for image_id, (file_name, width, height) in images.items():
        if not isinstance(file_name, str) or not file_name:
            raise CnnlabError(f"{path}: image {image_id!r} has no file_name string")
        for name, value in (("width", width), ("height", height)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise CnnlabError(
                    f"{path}: image {image_id!r} has {name} {_shown(value)}, not a positive int"
                )
    objects: dict[object, list[tuple[list[float], int]]] = {key: [] for key in images}
    for index, ann in enumerate(data["annotations"]):
        image_id = _check_annotation(path, index, ann, images, label_of)
        # Crowd regions are not objects to detect; COCO's own evaluation ignores them too.
        if not ann.get("iscrowd", 0):
            objects[image_id].append((ann["bbox"], label_of[ann["category_id"]]))
    samples = []
    for image_id, (file_name, width, height) in images.items():
        image_path = _coco_image_path(Path(folder), file_name, path)
        if not image_path.is_file():
            raise CnnlabError(f"{path}: image {file_name!r} (id {image_id}) not found")
        if width is None or height is None:
            width, height = image_size(image_path)
        boxes, labels = [], []
        for (x, y, w, h), label in objects[image_id]:
            box = _clip_box(image_path, (x, y, x + w, y + h), width, height)
            if box is not None:
                boxes.append(box)
                labels.append(label)
        samples.append(DetectionSample(image_path, width, height, tuple(boxes), tuple(labels)))
    return classes, samples


def _coco_entries(path: Path, entries: list, kind: str, keys: tuple[str, ...]) -> list[dict]:
    """``entries`` (COCO's images or categories) after checking that each is an object with
    ``keys`` and an ``id`` that is an integer or a string, unique, one type for all (so
    they sort and look up as COCO tools expect); errors name the entry."""
    types = set()
    seen = set()
    for index, entry in enumerate(entries):
        where = f"{path}: {kind} {index}"
        if not isinstance(entry, dict):
            raise CnnlabError(f"{where} is not an object")
        missing = [key for key in keys if key not in entry]
        if missing:
            raise CnnlabError(f"{where} lacks '{missing[0]}'")
        entry_id = entry["id"]
        if isinstance(entry_id, bool) or not isinstance(entry_id, int | str):
            raise CnnlabError(f"{where}: id must be an integer or a string, got {_shown(entry_id)}")
        if entry_id in seen:
            raise CnnlabError(f"{where}: id {_shown(entry_id)} is used twice")
        seen.add(entry_id)
        types.add(type(entry_id))
    if len(types) > 1:
        raise CnnlabError(f"{path}: {kind} ids mix integers and strings; use one kind")
    return list(entries)


def _shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hashable_id(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | str)


def _check_annotation(path: Path, index: int, ann: object, images: dict, label_of: dict):
    """The annotation's image id, after checking its fields; errors name the annotation."""
    where = f"{path}: annotation {index}"
    if not isinstance(ann, dict):
        raise CnnlabError(f"{where} is not an object")
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
    )
    if not (numbers and len(bbox) == 4):
        raise CnnlabError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
    for key, known in (("image_id", images), ("category_id", label_of)):
        value = ann.get(key)
        if not _hashable_id(value) or value not in known:
            raise CnnlabError(f"{where}: unknown {key} {_shown(value)}")
    return ann["image_id"]


def _coco_image_path(folder: Path, file_name: str, source: Path) -> Path:
    """The image a COCO ``file_name`` names: relative to ``folder/images`` (some tools write
    "images/x.jpg", relative to ``folder``), and never outside ``folder``."""
    if "\x00" in file_name:
        raise CnnlabError(f"{source}: file_name {_shown(file_name)} holds a NUL byte")
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CnnlabError(
            f"{source}: file_name {file_name!r} must be a path inside {folder}, not absolute"
            " and without '..'"
        )
    inside = folder / "images" / relative
    path = inside if inside.exists() or not (folder / relative).exists() else folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CnnlabError(f"{source}: file_name {file_name!r} leads outside {folder} (a link)")
    return path


def read_yolo(folder: Path) -> tuple[list[str], list[DetectionSample]]:
    """Classes (``classes.txt``) and samples of a YOLO-txt folder."""
    folder = Path(folder)
    classes = [
        line.strip() for line in read_text(folder / "classes.txt").splitlines() if line.strip()
    ]
    if not classes:
        raise CnnlabError(f"{folder / 'classes.txt'}: no class names")
    samples = []
    images = folder / "images"
    for image_path in _image_files(images):
        width, height = image_size(image_path)
        boxes, labels = [], []
        label_file = (folder / "labels" / image_path.relative_to(images)).with_suffix(".txt")
        for box, label in _read_yolo_labels(label_file, classes):
            cx, cy, w, h = box
            pixels = ((cx - w / 2) * width, (cy - h / 2) * height)
            pixels += (pixels[0] + w * width, pixels[1] + h * height)
            clipped = _clip_box(image_path, pixels, width, height)
            if clipped is not None:
                boxes.append(clipped)
                labels.append(label)
        samples.append(DetectionSample(image_path, width, height, tuple(boxes), tuple(labels)))
    return classes, samples


def _read_yolo_labels(path: Path, classes: list[str]) -> list[tuple[list[float], int]]:
    """(cx, cy, w, h) normalised and the class index per line; errors give the line number."""
    if not path.is_file():
        return []
    objects = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise CnnlabError(f"{path}:{number}: expected 'class cx cy w h', got {line.strip()!r}")
        try:
            label, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise CnnlabError(f"{path}:{number}: not numbers: {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise CnnlabError(f"{path}:{number}: not finite numbers: {line.strip()!r}")
        if not 0 <= label < len(classes):
            raise CnnlabError(
                f"{path}:{number}: class {label} is not in classes.txt (0..{len(classes) - 1})"
            )
        objects.append((values, label))
    return objects


def _clip_box(
    image: Path, box: Sequence[float], width: int, height: int
) -> tuple[float, float, float, float] | None:
    """The box clipped to the image (warning when it moved), or None for zero area."""
    x1, y1, x2, y2 = (float(v) for v in box)
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    clipped += (min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    shown = [round(v, 1) for v in box]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        log.warning(
            "%s: dropped box %s: zero area inside the %dx%d image", image, shown, width, height
        )
        return None
    if clipped != (x1, y1, x2, y2):
        log.warning(
            "%s: box %s lies partly outside the %dx%d image; clipped", image, shown, width, height
        )
    return clipped


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CnnlabError(f"{folder}: no such folder")
    files = walk_files(folder)[0]
    if not files:
        raise CnnlabError(f"{folder}: no image files")
    return files


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


class DetectionDataset(torch.utils.data.Dataset):
    """Samples as (image float (C, S, S), target) with target ``boxes`` (N, 4) in the
    transformed image's pixels, ``labels`` (N,), ``size`` (2,) = original (H, W) and
    ``index`` into ``samples``; given ``proposals`` (boxes (M, 4) in each image's pixels,
    by path), also ``proposals`` moved by the same transform."""

    def __init__(
        self,
        samples: list[DetectionSample],
        transform: Callable,
        in_channels: int = 3,
        proposals: dict[Path, np.ndarray] | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.in_channels = in_channels
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.samples[index]
        image = tv_tensors.Image(read_image(sample.path, self.in_channels))
        height, width = image.shape[-2:]
        boxes = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(sample.labels, dtype=torch.int64)
        if self.proposals is not None:
            # Proposals ride along as boxes of label -1, so every transform (flip, affine,
            # dropping boxes that leave the image) moves them exactly as the objects.
            extra = torch.as_tensor(self.proposals[sample.path], dtype=torch.float32)
            boxes = torch.cat([boxes, extra.reshape(-1, 4)])
            labels = torch.cat([labels, torch.full((len(extra),), -1, dtype=torch.int64)])
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        image, target = self.transform(image, {"boxes": boxes, "labels": labels})
        boxes, labels = target["boxes"].as_subclass(torch.Tensor), target["labels"]
        found = {
            "boxes": boxes[labels >= 0],
            "labels": labels[labels >= 0],
            "size": torch.tensor([height, width]),
            "index": torch.tensor(index),
        }
        if self.proposals is not None:
            found["proposals"] = boxes[labels < 0]
        return image.as_subclass(torch.Tensor), found


def collate_detection(
    batch: list[tuple[torch.Tensor, dict]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack the (equal-sized) images; targets stay a list, one dict per image."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)
