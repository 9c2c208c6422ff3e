"""Image folders: read, check, clean and split a ``DIR/<class>/<image>`` tree.

Two layouts are understood. A class-folder tree (``DIR/<class>/*.jpg``) is split into
train/val/test by ``make_splits``, stratified by class. A pre-split tree (``DIR/train/<class>``,
``DIR/val/<class>`` and optionally ``DIR/test/<class>``) is used as given; a missing ``val``
or ``test`` part is carved out of ``train`` the same stratified way.

Files and folders whose names start with ``.`` (``.DS_Store``, macOS ``._photo.jpg``) and
``__MACOSX`` folders are never images and are skipped everywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from cnnlab.errors import CnnlabError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
Sample = tuple[Path, int]  # (absolute path, class index)

SPLIT_NAMES = ("train", "val", "test")
MIN_IMAGES_PER_CLASS = 3  # one each for train, val and test
DEFAULT_STRIP_PREFIX = r"^n\d+[-_]"  # WordNet ids: n02085620-Chihuahua -> Chihuahua
REPORT_NAME = "clean_report.json"

_SKIP_NAMES = frozenset({"__MACOSX"})
_TORCHVISION_FORMATS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp"}
_PIL_FORMATS = {"BMP": ".bmp", "TIFF": ".tiff"}
_SOURCE_PATH = re.compile(r"^.*\.cpp:\d+, ")  # torchvision prefixes C++ errors with its source


class BadImageError(CnnlabError):
    """A file with an image extension that cannot be decoded; ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --- reading images ------------------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _decode_torchvision(data: bytes, fmt: str, path: Path) -> torch.Tensor:
    # Colour type 3 (palette): decode_image(UNCHANGED) returns the palette *indices* as one
    # grey channel, so palette PNGs are expanded to RGB instead.
    palette = fmt == "png" and len(data) > 25 and data[25] == 3
    mode = ImageReadMode.RGB if palette else ImageReadMode.UNCHANGED
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; still the
            # pinned, fastest way to decode here.
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(encoded, mode=mode, apply_exif_orientation=True)
    except RuntimeError as err:
        message = _SOURCE_PATH.sub("", str(err).splitlines()[0])
        raise BadImageError(path, f"corrupt or truncated {fmt.upper()}: {message}") from None
    return image[0] if image.ndim == 4 else image  # an animated GIF: (N, C, H, W) -> frame 0


def _decode_pil(data: bytes, path: Path) -> tuple[torch.Tensor, str]:
    # torchvision cannot decode BMP or TIFF; Pillow can, and refuses everything else here.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as pil:
            fmt = pil.format or "unknown"
            pil.load()
            if pil.mode not in ("L", "RGB", "I;16"):
                pil = pil.convert("L" if pil.mode in ("1", "LA", "I", "F") else "RGB")
            array = torch.from_numpy(np.array(pil))
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (content is not a known image format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(path, f"corrupt or truncated image: {err}") from None
    image = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    return image, fmt


def decode_bytes(data: bytes, path: Path | str = "<bytes>") -> tuple[torch.Tensor, str]:
    """Decode an encoded image to uint8 (C, H, W) with C in {1, 3}; also return its format.

    Grey stays one channel; grey+alpha drops alpha; palette and RGBA become RGB; 16-bit
    images are scaled to 8 bits; EXIF orientation is applied. Raises BadImageError.
    """
    path = Path(path)
    if not data:
        raise BadImageError(path, "empty file")
    fmt = _sniff(data)
    if fmt == "png" and b"IEND" not in data[-64:]:
        raise BadImageError(path, "truncated PNG (no IEND chunk at the end)")
    if fmt is None:
        image, fmt = _decode_pil(data, path)
    else:
        image = _decode_torchvision(data, fmt, path)
    if image.dtype != torch.uint8:
        image = to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG/TIFF
    channels = image.shape[0]
    if channels in (2, 4):
        image = image[: channels - 1]  # drop alpha
    if image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
        raise BadImageError(path, f"unsupported image shape {tuple(image.shape)}")
    return image, fmt.lower()


def read_image(path: Path | str) -> torch.Tensor:
    """Read an image file as uint8 (C, H, W), C in {1, 3}; BadImageError names path and reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err.strerror or err}") from None
    return decode_bytes(data, path)[0]


def is_grayscale(image: torch.Tensor, tolerance: int = 3) -> bool:
    """True for one channel, or three channels equal within ``tolerance`` (grey saved as RGB)."""
    if image.shape[0] == 1:
        return True
    spread = image.amax(dim=0).to(torch.int16) - image.amin(dim=0).to(torch.int16)  # (H, W)
    return int(spread.max()) <= tolerance


def detect_in_channels(paths: Iterable[Path | str], max_samples: int = 32) -> int:
    """1 when every sampled readable image is grayscale, else 3 (also 3 when none is readable)."""
    paths = sorted(Path(p) for p in paths)
    step = max(1, math.ceil(len(paths) / max_samples))
    readable = 0
    for path in paths[::step]:
        try:
            image = read_image(path)
        except BadImageError:
            continue
        if not is_grayscale(image):
            return 3
        readable += 1
    return 1 if readable else 3


# --- scanning ------------------------------------------------------------------------------


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _SKIP_NAMES


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))


def _walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, sorted by path."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        for name in filenames:
            if not _visible(name):
                continue
            path = Path(dirpath, name)
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return sorted(images), sorted(others)


def _require_dir(root: Path) -> Path:
    if not root.exists():
        raise CnnlabError(f"{root}: folder not found")
    if not root.is_dir():
        raise CnnlabError(f"{root}: not a folder")
    return root.absolute()


def _is_presplit(root: Path) -> bool:
    return (root / "train").is_dir()


def scan_class_folders(root: Path) -> tuple[list[str], list[Sample]]:
    """Sorted class names and (path, class index) samples of a ``root/<class>/...`` tree."""
    root = _require_dir(Path(root))
    class_dirs = _class_dirs(root)
    if not class_dirs:
        loose = _walk_files(root)[0]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise CnnlabError(f"{root}: no class folders, expected {root}/<class>/<image>{hint}")
    classes, samples = [], []
    for label, folder in enumerate(class_dirs):
        images = _walk_files(folder)[0]
        if not images:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise CnnlabError(f"{folder}: class folder has no image files ({exts})")
        classes.append(folder.name)
        samples.extend((path, label) for path in images)
    return classes, samples


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
    presplit: (
        bool  # root/train (and val/test) folders were given; fractions carve only what is missing
    )

    def to_json(self) -> dict:
        """A JSON-ready dict; paths are relative to ``root`` (POSIX style)."""

        def rel(samples: list[Sample]) -> list[list]:
            return [[path.relative_to(self.root).as_posix(), label] for path, label in samples]

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
    def from_json(cls, data: dict, root: Path | None = None) -> Splits:
        """Rebuild from ``to_json`` output; ``root`` overrides the recorded root (moved data)."""
        keys = ("root", "classes", "seed", "val_split", "test_split", "presplit", *SPLIT_NAMES)
        missing = [key for key in keys if key not in data]
        if missing:
            raise CnnlabError(f"split.json: missing key(s) {', '.join(missing)}")
        base = Path(root if root is not None else data["root"]).absolute()
        classes = [str(name) for name in data["classes"]]

        def samples(name: str) -> list[Sample]:
            out = []
            for rel, label in data[name]:
                if not 0 <= int(label) < len(classes):
                    raise CnnlabError(f"split.json: {rel} has label {label} outside the classes")
                out.append((base / rel, int(label)))
            return out

        return cls(
            root=base,
            classes=classes,
            train=samples("train"),
            val=samples("val"),
            test=samples("test"),
            seed=int(data["seed"]),
            val_split=float(data["val_split"]),
            test_split=float(data["test_split"]),
            presplit=bool(data["presplit"]),
        )


def _split_count(n: int, fraction: float) -> int:
    # Round half up (not Python's half-to-even) and never to 0: every class in every split.
    return 0 if fraction == 0 else max(1, math.floor(n * fraction + 0.5))


def _stratified(
    samples: list[Sample], classes: list[str], val_split: float, test_split: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    by_class: dict[int, list[Path]] = defaultdict(list)
    for path, label in samples:
        by_class[label].append(path)
    train, val, test = [], [], []
    need = 1 + (val_split > 0) + (test_split > 0)
    for label, name in enumerate(classes):
        paths = sorted(by_class[label])  # sorted: independent of the filesystem listing order
        n = len(paths)
        if n < need:
            raise CnnlabError(
                f"class {name!r} has {n} image(s) but a train/val/test split needs at least "
                f"{need} per class; add images or lower --val-split/--test-split to 0"
            )
        n_val, n_test = _split_count(n, val_split), _split_count(n, test_split)
        while n_val + n_test > n - 1:  # keep at least one training image
            if n_val >= n_test and n_val > 1:
                n_val -= 1
            else:
                n_test -= 1
        # A per-class generator seeded by (seed, class name): adding or removing one class
        # leaves every other class's split unchanged.
        random.Random(f"{seed}/{name}").shuffle(paths)
        val += [(p, label) for p in paths[:n_val]]
        test += [(p, label) for p in paths[n_val : n_val + n_test]]
        train += [(p, label) for p in paths[n_val + n_test :]]
    return sorted(train), sorted(val), sorted(test)


def _check_fractions(val_split: float, test_split: float) -> None:
    for name, value in (("val_split", val_split), ("test_split", test_split)):
        if not 0 <= value < 1:
            raise CnnlabError(f"{name} must be in [0, 1), got {value}")
    if val_split + test_split >= 1:
        raise CnnlabError(f"val_split + test_split must be below 1, got {val_split + test_split}")


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
    root: Path, val_split: float = 0.1, test_split: float = 0.1, seed: int = 0
) -> Splits:
    """Train/val/test samples of ``root``: its train/val/test folders, or a stratified split.

    Stratified per class with a per-class seeded shuffle of the sorted file list, so the same
    seed and files give the same split whatever order the filesystem lists them in. Every
    class gets at least one image in each requested split; a class too small for that is a
    CnnlabError naming it and its count.
    """
    root = _require_dir(Path(root))
    _check_fractions(val_split, test_split)
    presplit = _is_presplit(root)
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


# --- checking and cleaning -----------------------------------------------------------------


@dataclass
class _FileInfo:
    split: str | None  # "train"/"val"/"test" in a pre-split tree, else None
    cls: str
    path: Path
    rel: str  # path relative to the scanned root, POSIX style
    digest: str = ""
    fmt: str = ""
    shape: tuple[int, int, int] | None = None  # (C, H, W) when readable
    reason: str | None = None  # why it is unreadable


def _part_key(key: tuple[str | None, str]) -> tuple[int, str]:
    split, cls = key
    return (SPLIT_NAMES.index(split) if split else 0, cls)


def _parts(root: Path) -> list[tuple[str | None, Path]]:
    if _is_presplit(root):
        return [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    return [(None, root)]


def _inspect(root: Path) -> tuple[list[_FileInfo], list[str], list[tuple[str | None, str]]]:
    """Decode and hash every image file: (file infos, ignored files, empty class folders)."""
    infos, ignored, empty = [], [], []
    for split, part in _parts(root):
        for folder in _class_dirs(part):
            images, others = _walk_files(folder)
            ignored += [p.relative_to(root).as_posix() for p in others]
            if not images:
                empty.append((split, folder.name))
            for path in images:
                infos.append(_inspect_file(root, split, folder.name, path))
    return infos, ignored, empty


def _inspect_file(root: Path, split: str | None, cls: str, path: Path) -> _FileInfo:
    info = _FileInfo(split, cls, path, path.relative_to(root).as_posix())
    try:
        data = path.read_bytes()
        image, info.fmt = decode_bytes(data, path)
    except OSError as err:
        info.reason = f"cannot read file: {err.strerror or err}"
    except BadImageError as err:
        info.reason = err.reason
    else:
        info.digest = hashlib.sha256(data).hexdigest()
        info.shape = tuple(image.shape)
    return info


def _duplicate_groups(infos: list[_FileInfo]) -> list[list[_FileInfo]]:
    by_digest: dict[str, list[_FileInfo]] = defaultdict(list)
    for info in infos:
        if info.reason is None:
            by_digest[info.digest].append(info)
    return sorted((g for g in by_digest.values() if len(g) > 1), key=lambda g: g[0].rel)


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def check_folder(root: Path) -> dict:
    """Decode every image under ``root`` and report what would trouble training.

    Keys: ``classes`` {name: readable images}, ``bad_files`` [{path, reason}], ``duplicates``
    (groups of identical files), ``cross_class_duplicates`` (the groups spanning classes:
    ambiguous labels), ``sizes`` (width/height min/median/max, channel counts),
    ``too_small`` (classes with fewer than 3 readable images: too few for train/val/test),
    ``empty_classes``, ``ignored_files`` (no image extension) and, for a pre-split tree,
    ``splits`` {split: {class: count}}. Paths are relative to ``root``.
    """
    root = _require_dir(Path(root))
    infos, ignored, empty = _inspect(root)
    good = [i for i in infos if i.reason is None]
    classes: dict[str, int] = {}
    splits: dict[str, dict[str, int]] = defaultdict(dict)
    for split, cls in sorted({(i.split, i.cls) for i in infos} | set(empty), key=_part_key):
        count = sum(1 for i in good if i.split == split and i.cls == cls)
        classes[cls] = classes.get(cls, 0) + count
        if split is not None:
            splits[split][cls] = count
    groups = _duplicate_groups(infos)
    channels = defaultdict(int)
    for info in good:
        channels[str(info.shape[0])] += 1
    report = {
        "root": str(root),
        "layout": "presplit" if _is_presplit(root) else "class_folders",
        "num_images": len(good),
        "classes": dict(sorted(classes.items())),
        "bad_files": [{"path": i.rel, "reason": i.reason} for i in infos if i.reason],
        "duplicates": [[i.rel for i in g] for g in groups],
        "cross_class_duplicates": [
            [i.rel for i in g] for g in groups if len({i.cls for i in g}) > 1
        ],
        "sizes": {
            "width": _stats([i.shape[2] for i in good]),
            "height": _stats([i.shape[1] for i in good]),
            "channels": dict(sorted(channels.items())),
        },
        "too_small": [
            {"class": c, "count": n} for c, n in classes.items() if n < MIN_IMAGES_PER_CLASS
        ],
        "empty_classes": sorted({cls for _, cls in empty}),
        "ignored_files": ignored,
    }
    if splits:
        report["splits"] = dict(splits)
    return report


def summarize_check(report: dict) -> str:
    """A short human-readable account of a ``check_folder`` report (for the terminal)."""
    lines = [
        f"{report['root']}: {report['num_images']} readable images, "
        f"{len(report['classes'])} classes ({report['layout']})"
    ]
    lines += [f"  {name}: {count}" for name, count in report["classes"].items()]
    sizes = report["sizes"]
    if sizes["width"]:
        w, h = sizes["width"], sizes["height"]
        lines.append(
            f"sizes (WxH): min {w['min']}x{h['min']}, median {w['median']}x{h['median']}, "
            f"max {w['max']}x{h['max']}; channels {sizes['channels']}"
        )
    lines += [f"bad file: {b['path']}: {b['reason']}" for b in report["bad_files"]]
    cross = {tuple(g) for g in report["cross_class_duplicates"]}
    for group in report["duplicates"]:
        kind = "duplicate across classes" if tuple(group) in cross else "duplicate"
        lines.append(f"{kind}: {', '.join(group)}")
    lines += [
        f"too small to split: {t['class']} ({t['count']} images, need {MIN_IMAGES_PER_CLASS})"
        for t in report["too_small"]
    ]
    if report["ignored_files"]:
        lines.append(f"ignored {len(report['ignored_files'])} non-image file(s)")
    return "\n".join(lines)


def require_new_folder(dst: Path) -> Path:
    """CnnlabError unless ``dst`` is missing or an empty folder: user data is never overwritten."""
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CnnlabError(f"{dst}: already exists and is not empty; choose a new folder")
    return dst


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst`` that becomes ``dst`` when the block succeeds.

    ``dst`` must pass ``require_new_folder``; on any error the temporary folder is removed,
    so an interrupted write never leaves a half-filled ``dst``.
    """
    dst = require_new_folder(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield staging
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _clean_names(root: Path, pattern: re.Pattern) -> dict[tuple[str | None, str], str]:
    names: dict[tuple[str | None, str], str] = {}
    for split, part in _parts(root):
        taken: dict[str, str] = {}
        for folder in _class_dirs(part):
            new = pattern.sub("", folder.name, count=1).strip()
            if not new:
                raise CnnlabError(f"{folder}: class name is empty once the prefix is removed")
            # Case-insensitive: "Dog" and "dog" would merge on macOS and Windows.
            if new.lower() in taken:
                raise CnnlabError(
                    f"{part}: class folders {taken[new.lower()]!r} and {folder.name!r} both "
                    f"clean to {new!r}; rename one or change --strip-prefix"
                )
            taken[new.lower()] = folder.name
            names[(split, folder.name)] = new
    return names


def _choose_files(
    infos: list[_FileInfo], names: dict[tuple[str | None, str], str]
) -> tuple[list[_FileInfo], list[dict]]:
    """(files to copy, [{path, reason}] left out): bad files and duplicates go."""
    left_out = [{"path": i.rel, "reason": i.reason} for i in infos if i.reason]
    dropped: set[str] = set()
    for group in _duplicate_groups(infos):
        labels = sorted({names[(i.split, i.cls)] for i in group})
        if len(labels) > 1:
            reason = (
                f"duplicate across classes {', '.join(labels)}: "
                "label ambiguous, all copies left out"
            )
            drop = group
        else:
            # Prefer the copy in train, then val, then test: a leaked copy leaves the eval set.
            order = {name: k for k, name in enumerate(SPLIT_NAMES)}
            group = sorted(group, key=lambda i: (order.get(i.split, 0), i.rel))
            reason = f"duplicate of {group[0].rel} (kept)"
            drop = group[1:]
        for info in drop:
            left_out.append({"path": info.rel, "reason": reason})
            dropped.add(info.rel)
    kept = [i for i in infos if i.reason is None and i.rel not in dropped]
    return kept, sorted(left_out, key=lambda d: d["path"])


def _extension(info: _FileInfo) -> str:
    # Name the file after its content: a PNG saved as .jpg becomes .png.
    ext = _TORCHVISION_FORMATS.get(info.fmt) or _PIL_FORMATS.get(info.fmt.upper())
    return ext or info.path.suffix.lower().replace(".jpeg", ".jpg")


def clean_folder(src: Path, dst: Path, strip_prefix: str = DEFAULT_STRIP_PREFIX) -> dict:
    """Copy ``src`` into a new ``dst`` with clean class names and no bad or duplicate files.

    Class folders lose the ``strip_prefix`` regex (WordNet ids by default); files become
    ``<class>_<NNNN>.<ext>`` (extension from the content); unreadable files, all but the
    first of each duplicate group, and every copy of a duplicate spanning classes are left
    out. The returned report is also written to ``dst/clean_report.json``. ``src`` is only
    read; ``dst`` is built in a temporary folder beside it and renamed into place at the
    end, so a failure never leaves a half-written ``dst``.
    """
    try:
        pattern = re.compile(strip_prefix)
    except re.error as err:
        raise CnnlabError(f"--strip-prefix {strip_prefix!r} is not a valid regex: {err}") from None
    src = _require_dir(Path(src))
    dst = require_new_folder(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise CnnlabError(f"{dst}: destination is inside the source folder {src}")
    names = _clean_names(src, pattern)
    infos, ignored, empty = _inspect(src)
    kept, left_out = _choose_files(infos, names)
    with staged_folder(dst) as staging:
        copied, counts = _copy_files(kept, names, staging)
        report = {
            "src": str(src),
            "dst": str(dst),
            "strip_prefix": strip_prefix,
            "classes": counts,
            "renamed_classes": {old: new for (_, old), new in names.items() if old != new},
            "copied": copied,
            "left_out": left_out,
            "empty_classes": sorted({names[key] for key in empty}),
            "too_small": [
                {"class": c, "count": n} for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS
            ],
            "ignored_files": ignored,
        }
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _copy_files(
    kept: list[_FileInfo], names: dict[tuple[str | None, str], str], staging: Path
) -> tuple[list[dict], dict[str, int]]:
    by_class: dict[tuple[str | None, str], list[_FileInfo]] = defaultdict(list)
    for info in kept:
        by_class[(info.split, names[(info.split, info.cls)])].append(info)
    copied, counts = [], defaultdict(int)
    for (split, cls), files in sorted(by_class.items(), key=lambda item: _part_key(item[0])):
        folder = staging / split / cls if split else staging / cls
        folder.mkdir(parents=True)
        width = max(4, len(str(len(files))))
        for number, info in enumerate(sorted(files, key=lambda i: i.rel), start=1):
            target = folder / f"{cls}_{number:0{width}d}{_extension(info)}"
            shutil.copyfile(info.path, target)
            copied.append({"from": info.rel, "to": target.relative_to(staging).as_posix()})
        counts[cls] += len(files)
    return copied, dict(sorted(counts.items()))
