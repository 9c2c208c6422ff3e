"""Classification data: a ``DIR/<class>/<image>`` tree, its stratified split, the dataset.

Two layouts are understood. A class-folder tree (``DIR/<class>/*.jpg``) is split into
train/val/test by ``make_splits``, stratified by class. A pre-split tree
(``DIR/train/<class>``, ``DIR/val/<class>`` and optionally ``DIR/test/<class>``) is used as
given; a missing ``val`` or ``test`` part is carved out of ``train`` the same stratified way.
A label CSV (``cnnlab.data.labels``) is split as a class-folder tree is.

An unreadable image never stops training: ``ImageDataset`` logs one warning naming the file
(``logging.getLogger("cnnlab")``) and returns ``None``; ``collate_skip_bad`` drops the
``None`` items. A batch whose items are all bad collates to two empty tensors
(``labels.numel() == 0``), which the training loop skips. With ``num_workers > 0`` every
worker holds its own copy of the dataset, so an uncached bad file is reported once per
worker; cached datasets decode (and warn) once, up front.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate

from cnnlab.data.images import BadImageError, read_image
from cnnlab.data.labels import (
    Sample,
    as_multi_label_samples,
    is_label_csv,
    is_multi,
    read_label_csv,
)
from cnnlab.data.listing import (
    IMAGE_EXTENSIONS,
    is_image_name,
    require_folder,
    visible,
    walk_files,
)
from cnnlab.data.splits import (
    SPLIT_NAMES,
    check_fractions,
    fold_items,
    read_split_file,
    split_items,
    split_member,
)
from cnnlab.errors import CnnlabError
from cnnlab.files import display_name

log = logging.getLogger("cnnlab")

CACHE_LIMIT_BYTES = 1 << 30  # decode once into memory when the set is estimated below this
_PROBE_IMAGES = 8  # images decoded to estimate the decoded size of the whole set


# --- scanning ------------------------------------------------------------------------------


def class_dirs(root: Path) -> list[Path]:
    """The visible sub-folders of ``root``, sorted: its classes."""
    return sorted(p for p in root.iterdir() if p.is_dir() and visible(p.name))


def is_presplit(root: Path) -> bool:
    """Whether ``root`` holds train/ (and val/, test/) parts rather than class folders."""
    return (root / "train").is_dir()


def scan_class_folders(root: Path) -> tuple[list[str], list[Sample]]:
    """Sorted class names and (path, class index) samples of a ``root/<class>/...`` tree."""
    root = require_folder(root)
    folders = class_dirs(root)
    if not folders:
        loose = walk_files(root)[0]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise CnnlabError(f"{root}: no class folders, expected {root}/<class>/<image>{hint}")
    loose = sorted(
        p.name for p in root.iterdir() if visible(p.name) and p.is_file() and is_image_name(p)
    )
    if loose:
        log.warning(
            "%s: %d image(s) lie beside the class folders, in no class, and are left out"
            " (first: %s)",
            root,
            len(loose),
            loose[0],
        )
    classes, samples = [], []
    for label, folder in enumerate(folders):
        images = walk_files(folder)[0]
        if not images:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise CnnlabError(f"{folder}: class folder has no image files ({exts})")
        classes.append(_class_name(folder))
        samples.extend((path, label) for path in images)
    return classes, samples


def _class_name(folder: Path) -> str:
    """The class a folder names; CnnlabError when its name holds bytes that are not UTF-8
    (Python reads each as a lone surrogate): class names are written to model.json, reports
    and exported files, which hold text."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:
        raise CnnlabError(
            f"{display_name(str(folder))}: the class folder's name is not UTF-8 text;"
            " rename it (class names are saved in model.json and reports)"
        ) from None
    return folder.name


# --- splits --------------------------------------------------------------------------------


@dataclass
class Splits:
    """Which files went to train, val and test; written to RUN/split.json."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]  # may be empty
    seed: int
    val_split: float
    test_split: float
    presplit: bool  # root/train (and val/test) were given; fractions carve only what is missing

    @property
    def multi_label(self) -> bool:
        """Whether the samples carry several labels each (a tuple of class indices)."""
        return any(is_multi(label) for _, label in self.train)

    def to_json(self) -> dict:
        """A JSON-ready dict; paths are relative to ``root`` (POSIX style)."""

        def rel(samples: list[Sample]) -> list[list]:
            return [
                [path.relative_to(self.root).as_posix(), list(label) if is_multi(label) else label]
                for path, label in samples
            ]

        return {
            "root": str(self.root),
            "classes": list(self.classes),
            "seed": self.seed,
            "val_split": self.val_split,
            "test_split": self.test_split,
            "presplit": self.presplit,
            "counts": {name: len(getattr(self, name)) for name in SPLIT_NAMES},
            "train": rel(self.train),
            "val": rel(self.val),
            "test": rel(self.test),
        }

    @classmethod
    def from_json(cls, path: Path) -> Splits:
        """The splits a run saved in ``path`` (its split.json), checked key by key."""
        data, root = read_split_file(path)
        try:
            classes = [str(name) for name in data["classes"]]

            def samples(name: str) -> list[Sample]:
                out = []
                for rel, label in data[name]:
                    labels = label if isinstance(label, list) else [label]
                    for one in labels:
                        if isinstance(one, bool) or not isinstance(one, int):
                            raise ValueError(f"{rel!r} has label {label!r}")
                        if not 0 <= one < len(classes):
                            raise ValueError(f"{rel!r} has label {one} outside the classes")
                    kept = tuple(label) if isinstance(label, list) else label
                    out.append((split_member(root.absolute(), rel, path), kept))
                return out

            return cls(
                root=root.absolute(),
                classes=classes,
                train=samples("train"),
                val=samples("val"),
                test=samples("test"),
                seed=int(data["seed"]),
                val_split=float(data["val_split"]),
                test_split=float(data["test_split"]),
                presplit=bool(data["presplit"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CnnlabError(f"{path}: not a cnnlab split file ({error})") from None


def strata(samples: Sequence[Sample], num_classes: int) -> dict[int, list[Sample]]:
    """The samples grouped by the class they are stratified on: their class, or in a
    multi-label set their rarest label (the fewest samples; the first of equals), so that
    every label, rare ones first, reaches each split. An image with no label is grouped
    with the rarest class of all."""
    counts = [0] * num_classes
    for _, label in samples:
        for one in label if is_multi(label) else (label,):
            counts[one] += 1
    rarest_overall = min(range(num_classes), key=lambda k: (counts[k] or len(samples) + 1, k))
    groups: dict[int, list[Sample]] = defaultdict(list)
    for path, label in samples:
        if not is_multi(label):
            groups[label].append((path, label))
        else:
            rarest = min(label, key=lambda k: (counts[k], k)) if label else rarest_overall
            groups[rarest].append((path, label))
    return groups


def as_multi_label(splits: Splits) -> Splits:
    """``splits`` with every label a tuple of class indices (``--multi-label`` on a
    class-folder tree or a CSV of one label per image)."""
    return replace(
        splits,
        train=as_multi_label_samples(splits.train),
        val=as_multi_label_samples(splits.val),
        test=as_multi_label_samples(splits.test),
    )


def _stratified(
    samples: list[Sample], classes: list[str], val_split: float, test_split: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    by_class = strata(samples, len(classes))
    train, val, test = [], [], []
    for label, name in enumerate(classes):
        if label not in by_class and is_multi(samples[0][1]):
            continue  # a label never the rarest of any image: its images split elsewhere
        # A per-class generator seeded by (seed, class name): adding or removing one class
        # leaves every other class's split unchanged.
        parts = split_items(
            by_class[label], val_split, test_split, f"{seed}/{name}", None, f"class {name!r}"
        )
        for split, chosen in zip((train, val, test), parts, strict=True):
            split += chosen
    return sorted(train), sorted(val), sorted(test)


def _scan_part(folder: Path, classes: list[str]) -> list[Sample]:
    part_classes, samples = scan_class_folders(folder)
    if part_classes != classes:
        missing = sorted(set(classes) - set(part_classes))
        extra = sorted(set(part_classes) - set(classes))
        raise CnnlabError(
            f"{folder}: class folders differ from {folder.parent / 'train'}"
            f" (missing: {', '.join(missing) or 'none'}; extra: {', '.join(extra) or 'none'})"
        )
    return samples


def make_splits(
    root: Path,
    val_split: float = 0.1,
    test_split: float = 0.1,
    seed: int = 0,
    images: Path | None = None,
    multi_label: bool = False,
) -> Splits:
    """Train/val/test samples of ``root``: its train/val/test folders, or a stratified split
    (of its class folders, or of a label CSV's rows with ``images``, ``read_label_csv``).

    Stratified per class (``cnnlab.data.splits.split_items`` with a seed per class), so the
    same seed and files give the same split whatever order the filesystem lists them in.
    Every class gets at least one image in each requested split; a class too small for
    that is a CnnlabError naming it and its count.
    """
    check_fractions(val_split, test_split)
    if is_label_csv(root):
        root, classes, samples = read_label_csv(Path(root), images, multi_label)
        presplit = False
    else:
        root = require_folder(root)
        presplit = is_presplit(root)
        classes, samples = scan_class_folders(root / "train" if presplit else root)
    if len(classes) < 2:
        raise CnnlabError(f"{root}: found only class {classes[0]!r}; classifying needs >= 2")
    given = {}
    if presplit:
        given = {n: _scan_part(root / n, classes) for n in ("val", "test") if (root / n).is_dir()}
    carve_val = 0.0 if "val" in given else val_split
    carve_test = 0.0 if "test" in given else test_split
    train, val, test = _stratified(samples, classes, carve_val, carve_test, seed)
    return Splits(
        root=root,
        classes=classes,
        train=train,
        val=given.get("val", val),
        test=given.get("test", test),
        seed=seed,
        val_split=val_split,
        test_split=test_split,
        presplit=presplit,
    )


def make_folds(splits: Splits, folds: int) -> list[Splits]:
    """Stratified K-fold splits of ``splits``' train and val images together: fold i
    validates on the i-th part of every class and trains on the rest; the test images stay
    held out, the same in every fold. A class with fewer images than folds is refused (a
    fold would validate without it)."""
    if folds < 2:
        raise CnnlabError(f"cross-validation needs at least 2 folds, got {folds}")
    by_class = strata(splits.train + splits.val, len(splits.classes))
    parts: list[list[Sample]] = [[] for _ in range(folds)]
    dealt = 0
    for label, name in enumerate(splits.classes):
        paths = by_class[label]
        if not paths and splits.multi_label:
            continue  # a label never the rarest of any image: its images are dealt elsewhere
        if len(paths) < folds:
            raise CnnlabError(
                f"class {name!r} has {len(paths)} image(s) outside the test split; {folds}"
                " folds need at least one per fold (lower --folds or add images)"
            )
        # Seeded per class, as the split is: adding a class leaves the others' folds.
        dealt_class = fold_items(paths, folds, f"{splits.seed}/{name}/folds", None, dealt)
        for part, in_fold in zip(parts, dealt_class, strict=True):
            part += in_fold
        dealt += len(paths)
    return [
        Splits(
            root=splits.root,
            classes=splits.classes,
            train=sorted(s for j, part in enumerate(parts) if j != i for s in part),
            val=sorted(parts[i]),
            test=splits.test,
            seed=splits.seed,
            val_split=splits.val_split,
            test_split=splits.test_split,
            presplit=splits.presplit,
        )
        for i in range(folds)
    ]


# --- datasets ------------------------------------------------------------------------------


def _estimate_bytes(samples: Sequence[Sample]) -> int:
    """Decoded uint8 size of the set, from the median of a few images spread through it."""
    step = max(1, len(samples) // _PROBE_IMAGES)
    sizes = []
    for path, _ in samples[::step][:_PROBE_IMAGES]:
        try:
            sizes.append(read_image(path).numel())
        except BadImageError:
            continue
    return int(statistics.median(sizes) * len(samples)) if sizes else 0


class ImageDataset(Dataset):
    """``dataset[i]`` -> (transformed image, label), or ``None`` when the file is unreadable.

    Images are read with ``in_channels`` channels (None: as stored). ``cache=None`` decodes
    every image once into memory (uint8) when the estimated decoded size is below
    ``CACHE_LIMIT_BYTES`` (1 GiB); True/False force it. The transform still runs on every
    access, so random augmentation differs each epoch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        in_channels: int | None = None,
        cache: bool | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.in_channels = in_channels
        self._reported: set[str] = set()
        if cache is None:
            cache = _estimate_bytes(self.samples) < CACHE_LIMIT_BYTES
        self._images: list[torch.Tensor | None] | None = (
            [self._decode(path) for path, _ in self.samples] if cache else None
        )

    @property
    def cached(self) -> bool:
        return self._images is not None

    def _decode(self, path: Path) -> torch.Tensor | None:
        try:
            return read_image(path, self.in_channels)
        except BadImageError as err:
            if str(path) not in self._reported:
                self._reported.add(str(path))
                log.warning("skipping unreadable image %s", err)
            return None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        image = self._images[index] if self._images is not None else self._decode(path)
        if image is None:
            return None
        return self.transform(image), label


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs, dropping ``None``; all bad -> two empty tensors."""
    good = [item for item in batch if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(good)


class MixingCollate:
    """``collate_skip_bad``, then ``mix`` (``transforms.batch_mix``) on the batch: labels
    become soft (B, K). A class, not a closure, so worker processes can unpickle it."""

    def __init__(self, mix: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.mix = mix

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = collate_skip_bad(batch)
        return self.mix(images, labels) if len(images) else (images, labels)


def _class_counts(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)  # (N,)
    return torch.bincount(labels, minlength=num_classes).float()  # (num_classes,)


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights with mean 1 over the classes present (absent: 0)."""
    counts = _class_counts(samples, num_classes)
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    return weights * present.sum() / weights.sum()


def balanced_sampler(
    samples: Sequence[Sample], num_classes: int, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draws ``len(samples)`` samples per epoch with replacement, each class equally often."""
    counts = _class_counts(samples, num_classes)
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    per_sample = (1.0 / counts.double())[labels]  # (N,)
    return WeightedRandomSampler(
        per_sample, num_samples=len(samples), replacement=True, generator=generator
    )
