"""The one seeded split: which items train, which validate, which test.

``split_items`` is used by every task: classification calls it once per class (a
stratified split), segmentation and detection once for the whole set. The items are
sorted first, so the split depends on the seed and the file names only, never on the
order a filesystem lists them in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cnnlab.errors import CnnlabError
from cnnlab.files import read_json

T = TypeVar("T")
SPLIT_NAMES = ("train", "val", "test")


def split_folder(root: Path, split: str) -> Path:
    """The folder an evaluation of ``split`` reads from a data folder ``root``: ``ROOT/split``
    when the data comes pre-split (train/ val/ test/), else the whole of ``root``."""
    return root / split if (root / split).is_dir() else root


def check_fractions(val_split: float, test_split: float) -> None:
    """CnnlabError unless both fractions are in [0, 1) and leave something to train on."""
    for name, value in (("val_split", val_split), ("test_split", test_split)):
        if not 0 <= value < 1:
            raise CnnlabError(f"{name} must be in [0, 1), got {value}")
    if val_split + test_split >= 1:
        raise CnnlabError(f"val_split + test_split must be below 1, got {val_split + test_split}")


def split_count(n: int, fraction: float) -> int:
    """How many of ``n`` items a fraction takes: rounded half up (not Python's half to
    even) and never 0 for a fraction above 0."""
    return 0 if fraction == 0 else max(1, math.floor(n * fraction + 0.5))


def split_items(
    items: Sequence[T],
    val_split: float,
    test_split: float,
    seed: int | str,
    key: Callable[[T], Any] | None = None,
    name: str = "the data",
) -> tuple[list[T], list[T], list[T]]:
    """(train, val, test): ``items`` sorted (by ``key``), shuffled by ``random.Random(seed)``,
    the first ``split_count(n, val_split)`` for val, the next for test, the rest train.

    Every requested split gets at least one item and train keeps at least one; fewer items
    than that is a CnnlabError naming ``name`` (a class, a folder).
    """
    ordered = sorted(items, key=key)
    n = len(ordered)
    need = 1 + (val_split > 0) + (test_split > 0)
    if n < need:
        raise CnnlabError(
            f"{name} has {n} image(s) but a train/val/test split needs at least {need};"
            " add images or lower --val-split/--test-split to 0"
        )
    n_val, n_test = split_count(n, val_split), split_count(n, test_split)
    while n_val + n_test > n - 1:  # keep at least one training item
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    random.Random(seed).shuffle(ordered)
    val, test, train = ordered[:n_val], ordered[n_val : n_val + n_test], ordered[n_val + n_test :]
    return sorted(train, key=key), sorted(val, key=key), sorted(test, key=key)


def fold_items(
    items: Sequence[T],
    folds: int,
    seed: int | str,
    key: Callable[[T], Any] | None = None,
    start: int = 0,
) -> list[list[T]]:
    """``items`` dealt into ``folds`` disjoint parts for K-fold cross-validation: sorted
    (by ``key``), shuffled by ``random.Random(seed)``, the j-th to part ``(start + j) %
    folds``; each part sorted. A caller dealing several groups (classes) passes the count
    dealt so far as ``start``, so the parts' sizes never differ by more than one."""
    ordered = sorted(items, key=key)
    random.Random(seed).shuffle(ordered)
    parts: list[list[T]] = [[] for _ in range(folds)]
    for j, item in enumerate(ordered):
        parts[(start + j) % folds].append(item)
    return [sorted(part, key=key) for part in parts]


def read_split_file(path: Path) -> tuple[dict, Path]:
    """A run's split.json and the data folder it records; a CnnlabError naming the file
    unless that folder still exists."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("root"), str):
        raise CnnlabError(f"{path}: not a cnnlab split file (no data folder recorded)")
    root = Path(data["root"])
    if not root.is_dir():
        raise CnnlabError(f"{path}: data folder {root} no longer exists; pass a data folder")
    return data, root


def inside(root: Path, relative: object, source: Path | str) -> Path:
    """``root / relative`` for a recorded relative path that stays inside ``root``."""
    if (
        not isinstance(relative, str)
        or Path(relative).is_absolute()
        or ".." in Path(relative).parts
    ):
        raise CnnlabError(f"{source}: {relative!r} is not a path inside the data folder")
    return root / relative


def split_member(root: Path, relative: object, source: Path | str) -> Path:
    """``inside``, for a file a run's split lists, which must still be there: a resume or
    an evaluation of the run's own split stops before any work, naming the file, rather
    than after an epoch of training."""
    path = inside(root, relative, source)
    if not path.is_file():
        raise CnnlabError(
            f"{path}: missing, but the run's split ({source}) lists it; put it back,"
            " or evaluate on a data folder"
        )
    return path
