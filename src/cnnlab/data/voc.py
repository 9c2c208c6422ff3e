"""Pascal VOC detection folders: ``Annotations/*.xml``, ``JPEGImages/`` and, optionally,
``ImageSets/Main/{train,val}.txt`` (a fixed split) and ``classes.txt`` (the class order).

The XML is parsed with defusedxml: a file declaring entities (an entity bomb, an external
entity that would read another file or a URL) is refused with one line naming it, never
expanded. VOC's pixel coordinates count from 1 and include their last pixel, so a VOC
box ``xmin..xmax`` covers cnnlab's ``[xmin - 1, xmax]`` (as torchvision and Detectron2
read it); ``voc_xml`` writes the reverse, rounded to whole pixels as VOC stores them.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError, SubElement, indent, tostring

import defusedxml
from defusedxml.ElementTree import parse

from cnnlab.data.listing import IMAGE_EXTENSIONS
from cnnlab.errors import CnnlabError
from cnnlab.files import read_text

ANNOTATIONS, IMAGES, IMAGE_SETS = "Annotations", "JPEGImages", Path("ImageSets") / "Main"
# (image path, width, height, [(box x1 y1 x2 y2 in pixels, class name)]) of one XML file
VocImage = tuple[Path, int, int, list[tuple[tuple[float, float, float, float], str]]]


def is_voc_folder(folder: Path) -> bool:
    return (Path(folder) / ANNOTATIONS).is_dir() and (Path(folder) / IMAGES).is_dir()


def read_voc(folder: Path) -> tuple[list[str], list[VocImage]]:
    """The classes (``classes.txt`` when there is one, else every object name, sorted) and
    each annotated image of a VOC folder, in file-name order."""
    folder = Path(folder)
    files = sorted((folder / ANNOTATIONS).glob("*.xml"))
    if not files:
        raise CnnlabError(f"{folder / ANNOTATIONS}: no .xml annotation files")
    images = [_read_xml(path, folder) for path in files]
    names = sorted({name for *_, objects in images for _, name in objects})
    listed = folder / "classes.txt"
    if listed.is_file():
        classes = [line.strip() for line in read_text(listed).splitlines() if line.strip()]
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise CnnlabError(f"{listed}: objects of class {unknown[0]!r} are not listed")
        return classes, images
    if not names:
        raise CnnlabError(f"{folder / ANNOTATIONS}: no objects in any annotation")
    return names, images


def voc_image_sets(folder: Path) -> dict[str, list[str]] | None:
    """``{"train": stems, "val": stems}`` from ImageSets/Main, when both lists exist."""
    sets = Path(folder) / IMAGE_SETS
    if not ((sets / "train.txt").is_file() and (sets / "val.txt").is_file()):
        return None
    return {
        name: [
            line.split()[0] for line in read_text(sets / f"{name}.txt").splitlines() if line.split()
        ]
        for name in ("train", "val")
    }


def _read_xml(path: Path, folder: Path) -> VocImage:
    try:
        root = parse(path).getroot()
    except defusedxml.DefusedXmlException as error:
        raise CnnlabError(f"{path}: refused: the XML declares entities ({error})") from None
    except (ParseError, OSError) as error:
        raise CnnlabError(f"{path}: not a readable XML file ({error})") from None
    width, height = (_number(root, f"size/{name}", path) for name in ("width", "height"))
    if not (width >= 1 and height >= 1 and width == int(width) and height == int(height)):
        raise CnnlabError(f"{path}: size {width}x{height} is not a positive whole image size")
    objects = []
    for index, item in enumerate(root.findall("object"), start=1):
        name = (item.findtext("name") or "").strip()
        if not name:
            raise CnnlabError(f"{path}: object {index} has no <name>")
        xmin, ymin, xmax, ymax = (
            _number(item, f"bndbox/{key}", path, index) for key in ("xmin", "ymin", "xmax", "ymax")
        )
        objects.append(((xmin - 1, ymin - 1, xmax, ymax), name))
    return _image_of(root, path, folder), int(width), int(height), objects


def _number(node: Element, where: str, path: Path, index: int | None = None) -> float:
    text = node.findtext(where)
    owner = f"object {index} " if index is not None else ""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CnnlabError(f"{path}: {owner}<{where}> is {text!r}, not a number")
    return value


def _image_of(root: Element, path: Path, folder: Path) -> Path:
    """JPEGImages/<filename>, else the image of the XML's own stem."""
    images = folder / IMAGES
    name = (root.findtext("filename") or "").strip()
    if name and "/" not in name and "\\" not in name and (images / name).is_file():
        return images / name
    for ext in sorted(IMAGE_EXTENSIONS):
        for candidate in (images / f"{path.stem}{ext}", images / f"{path.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise CnnlabError(f"{path}: its image {name or path.stem!r} is not in {images}")


def voc_xml(
    file_name: str,
    width: int,
    height: int,
    objects: list[tuple[tuple[float, float, float, float], str]],
) -> bytes:
    """One image's VOC annotation: boxes in pixels [x1, y1, x2, y2] written as VOC's
    1-based, inclusive whole-pixel coordinates."""
    root = Element("annotation")
    SubElement(root, "folder").text = IMAGES
    SubElement(root, "filename").text = file_name
    size = SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        SubElement(size, key).text = str(value)
    for (x1, y1, x2, y2), name in objects:
        item = SubElement(root, "object")
        SubElement(item, "name").text = name
        SubElement(item, "difficult").text = "0"
        box = SubElement(item, "bndbox")
        corners = (round(x1) + 1, round(y1) + 1, round(x2), round(y2))
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True):
            SubElement(box, key).text = str(value)
    indent(root)  # one element a line, as VOC's own files
    return tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
