"""Classification labels: a sample is (image path, label), the label one class index or, in
a multi-label set, the sorted tuple of its class indices; and the label CSV (``file,label``
rows, ``a;b`` for several labels) that names them instead of class folders."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnlab.data.listing import is_image_name, require_folder
from cnnlab.data.splits import inside
from cnnlab.errors import CnnlabError

# (absolute path, class index); in a multi-label set, the sorted tuple of its class indices
Sample = tuple[Path, Any]


def is_multi(label: Any) -> bool:
    """Whether a sample's label is a multi-label one (a tuple of class indices)."""
    return isinstance(label, tuple | list)


def as_multi_label_samples(samples: Sequence[Sample]) -> list[Sample]:
    """The samples with multi-label labels: a single class index becomes a 1-tuple."""
    return [(path, label if is_multi(label) else (label,)) for path, label in samples]


def multi_hot(label: Sequence[int], num_classes: int) -> torch.Tensor:
    """(num_classes,) float32 with 1 at each of ``label``'s class indices."""
    vector = torch.zeros(num_classes)
    vector[list(label)] = 1.0
    return vector


LABEL_COLUMNS = ("file", "label")  # a label CSV's header
LABEL_SEPARATOR = ";"  # between the labels of a multi-label cell: "cat;dog"


def is_label_csv(path: Path | str) -> bool:
    """Whether the data argument names a CSV of labels rather than a folder."""
    return Path(path).suffix.lower() == ".csv"


def read_label_csv(
    path: Path, images: Path | None = None, multi_label: bool = False
) -> tuple[Path, list[str], list[Sample]]:
    """(the images folder, sorted class names, samples) of a CSV of ``file,label`` rows
    (fastai's ``from_df``), its files relative to ``images`` (default: the CSV's folder).

    A label cell may hold several labels separated by ``;`` (``LABEL_SEPARATOR``); when one
    does, or with ``multi_label``, every sample's label is the sorted tuple of its class
    indices (multi-label classification), else one class index.

    Any error names the CSV and its line: an unknown or missing column, an empty label, a
    file that is missing, outside the images folder, not an image or listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"{path}: no such CSV file")
    root = require_folder(Path(images) if images is not None else path.parent).absolute()
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        raise CnnlabError(f"{path}: not a readable UTF-8 CSV file ({error})") from None
    rows = csv.reader(text.splitlines())
    header = [name.strip() for name in next(rows, [])]
    where = f"{path} line 1"
    for name in header:
        if name not in LABEL_COLUMNS:
            raise CnnlabError(f"{where}: unknown column {name!r}; the columns are file,label")
    for name in LABEL_COLUMNS:
        if name not in header:
            raise CnnlabError(f"{where}: no {name!r} column; the columns are file,label")
    file_at, label_at = header.index("file"), header.index("label")
    labelled: list[tuple[Path, tuple[str, ...]]] = []
    seen: dict[Path, int] = {}
    for row in rows:
        where = f"{path} line {rows.line_num}"
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(header):
            raise CnnlabError(f"{where}: {len(row)} fields, the header has {len(header)}")
        name, label = row[file_at].strip(), row[label_at].strip()
        if not label:
            raise CnnlabError(f"{where}: empty label for {name!r}")
        if "/" in label or "\\" in label:
            raise CnnlabError(f"{where}: label {label!r} holds a path separator")
        names = tuple(sorted({part.strip() for part in label.split(LABEL_SEPARATOR)}))
        if "" in names:
            raise CnnlabError(f"{where}: label {label!r} holds an empty label between ';'")
        if not name:
            raise CnnlabError(f"{where}: empty file name")
        file = inside(root, name, where)
        if not file.is_file():
            raise CnnlabError(f"{where}: no file {name!r} in {root}")
        if not is_image_name(file):
            raise CnnlabError(f"{where}: {name!r} is not an image file")
        if file in seen:
            raise CnnlabError(f"{where}: {name!r} is listed again (first on line {seen[file]})")
        seen[file] = rows.line_num
        labelled.append((file, names))
    classes = sorted({name for _, names in labelled for name in names})
    if not classes:
        raise CnnlabError(f"{path}: no rows of file,label")
    index = {name: i for i, name in enumerate(classes)}
    if multi_label or any(len(names) > 1 for _, names in labelled):
        return root, classes, sorted((f, tuple(index[n] for n in names)) for f, names in labelled)
    return root, classes, sorted((file, index[names[0]]) for file, names in labelled)
