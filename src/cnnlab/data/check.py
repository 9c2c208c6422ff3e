"""Checking and cleaning a class-folder tree: what would trouble training, and a clean copy.

``check_folder`` decodes every image and reports bad files, duplicates (within and across
classes), sizes and classes too small to split; ``clean_folder`` copies a tree into a new
folder with clean class names and without the bad files and duplicates, leaving the
source untouched.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cnnlab.data.classify import class_dirs, is_presplit
from cnnlab.data.images import BadImageError, decode_bytes, read_bytes, stored_mode
from cnnlab.data.labels import is_label_csv, is_multi, read_label_csv
from cnnlab.data.listing import is_image_name, require_folder, visible, walk_files
from cnnlab.data.splits import SPLIT_NAMES
from cnnlab.destinations import require_new_folder, staged_folder
from cnnlab.errors import CnnlabError
from cnnlab.files import write_json

MIN_IMAGES_PER_CLASS = 3  # one each for train, val and test
TINY_SIDE = 32  # images with a side below this are flagged: enlarged, they are mostly blur
# How decode_bytes turns a stored mode into what the model sees, for the report.
_CONVERTED = {
    "RGBA": "alpha dropped",
    "LA": "alpha dropped",
    "P": "palette expanded to RGB",
    "PA": "palette expanded to RGB",
    "CMYK": "converted to RGB",
    "YCbCr": "converted to RGB",
    "1": "read as grey",
    "I": "read as grey",
    "I;16": "scaled to 8 bits",
    "F": "read as grey",
}
# File names that say "a copy of another file": "x (copy).jpg", "x - Copy.jpg", "x (1).jpg".
_COPY_NAME = re.compile(r"(?i)(\bcopy\b|\(\d+\)\s*$|복사본)")
DEFAULT_STRIP_PREFIX = r"^n\d+[-_]"  # WordNet ids: n02085620-Chihuahua -> Chihuahua
REPORT_NAME = "clean_report.json"
_TORCHVISION_FORMATS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "webp": ".webp"}
_PIL_FORMATS = {"BMP": ".bmp", "TIFF": ".tiff"}


@dataclass
class _FileInfo:
    split: str | None  # "train"/"val"/"test" in a pre-split tree, else None
    cls: str
    path: Path
    rel: str  # path relative to the scanned root, POSIX style
    digest: str = ""
    fmt: str = ""
    mode: str = ""  # how the file stores its pixels (stored_mode)
    shape: tuple[int, int, int] | None = None  # (C, H, W) when readable
    reason: str | None = None  # why it is unreadable


def _part_key(key: tuple[str | None, str]) -> tuple[int, str]:
    split, cls = key
    return (SPLIT_NAMES.index(split) if split else 0, cls)


def _parts(root: Path) -> list[tuple[str | None, Path]]:
    if is_presplit(root):
        return [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    return [(None, root)]


def _source(root: Path, images: Path | None) -> tuple[Path, Path]:
    """(what the user named, the folder file paths are relative to): a class-folder tree
    is both; a label CSV lists files of its ``images`` folder."""
    if is_label_csv(root):
        return Path(root), read_label_csv(Path(root), images)[0]
    return require_folder(Path(root)), require_folder(Path(root))


def _inspect(
    root: Path, images: Path | None = None
) -> tuple[list[_FileInfo], list[str], list[tuple[str | None, str]]]:
    """Decode and hash every image file: (file infos, ignored files, empty class folders).
    Images lying beside the class folders belong to no class: they are ignored files. A
    label CSV (``read_label_csv``) lists its files and classes itself."""
    if is_label_csv(root):
        folder, classes, samples = read_label_csv(Path(root), images)
        if any(is_multi(k) for _, k in samples):
            # Its counts and the class-folder tree `clean` writes hold one class per image.
            raise CnnlabError(
                f"{root}: a multi-label CSV (labels split by ';'); data check and clean take"
                " one label per image"
            )
        return [_inspect_file(folder, None, classes[k], p) for p, k in samples], [], []
    infos, ignored, empty = [], [], []
    for split, part in _parts(root):
        ignored += [
            p.relative_to(root).as_posix()
            for p in sorted(part.iterdir())
            if visible(p.name) and p.is_file() and is_image_name(p)
        ]
        for folder in class_dirs(part):
            images, others = walk_files(folder)
            ignored += [p.relative_to(root).as_posix() for p in others]
            if not images:
                empty.append((split, folder.name))
            for path in images:
                infos.append(_inspect_file(root, split, folder.name, path))
    return infos, ignored, empty


def _inspect_file(root: Path, split: str | None, cls: str, path: Path) -> _FileInfo:
    info = _FileInfo(split, cls, path, path.relative_to(root).as_posix())
    try:
        data = read_bytes(path)
        image, info.fmt = decode_bytes(data, path)
    except BadImageError as err:
        info.reason = err.reason
    else:
        info.digest = hashlib.sha256(data).hexdigest()
        info.shape = tuple(image.shape)
        info.mode = stored_mode(data)
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


def check_folder(root: Path, images: Path | None = None) -> dict:
    """Decode every image under ``root`` and report what would trouble training.

    Keys: ``classes`` {name: readable images}, ``bad_files`` [{path, reason}], ``duplicates``
    (groups of identical files), ``cross_class_duplicates`` (the groups spanning classes:
    ambiguous labels), ``sizes`` (width/height min/median/max, channel counts),
    ``modes`` (how the files store pixels: RGB, L, RGBA, CMYK, ...), ``tiny`` (images with
    a side under 32 pixels), ``too_small`` (classes with fewer than 3 readable images: too
    few for train/val/test), ``empty_classes``, ``ignored_files`` (no image extension, or
    an image beside the class folders, in no class) and, for a pre-split tree, ``splits``
    {split: {class: count}}. Paths are relative to ``root``. A label CSV as ``root``
    (``cnnlab.data.labels.read_label_csv``; its paths relative to ``images``) is
    checked the same way, its rows read first (an error names the line).
    """
    root, _ = _source(root, images)
    infos, ignored, empty = _inspect(root, images)
    good = [i for i in infos if i.reason is None]
    classes: dict[str, int] = {}
    splits: dict[str, dict[str, int]] = defaultdict(dict)
    for split, cls in sorted({(i.split, i.cls) for i in infos} | set(empty), key=_part_key):
        count = sum(1 for i in good if i.split == split and i.cls == cls)
        classes[cls] = classes.get(cls, 0) + count
        if split is not None:
            splits[split][cls] = count
    groups = _duplicate_groups(infos)
    channels, modes = defaultdict(int), defaultdict(int)
    for info in good:
        channels[str(info.shape[0])] += 1
        modes[info.mode] += 1
    report = {
        "root": str(root),
        "layout": "csv"
        if is_label_csv(root)
        else "presplit"
        if is_presplit(root)
        else "class_folders",
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
            "modes": dict(sorted(modes.items())),
        },
        "tiny": [
            {"path": i.rel, "width": i.shape[2], "height": i.shape[1]}
            for i in good
            if min(i.shape[1:]) < TINY_SIDE
        ],
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
            f"max {w['max']}x{h['max']}"
        )
        lines.append(
            "stored as: "
            + ", ".join(
                f"{mode} {count}" + (f" ({_CONVERTED[mode]})" if mode in _CONVERTED else "")
                for mode, count in sizes["modes"].items()
            )
        )
    tiny = report["tiny"]
    if tiny:
        shown = ", ".join(f"{t['path']} ({t['width']}x{t['height']})" for t in tiny[:5])
        more = f" and {len(tiny) - 5} more" if len(tiny) > 5 else ""
        lines.append(f"tiny (a side under {TINY_SIDE} px): {shown}{more}")
    lines += [f"bad file: {b['path']}: {b['reason']}" for b in report["bad_files"]]
    cross = {tuple(g) for g in report["cross_class_duplicates"]}
    for group in report["duplicates"]:
        kind = "duplicate across classes" if tuple(group) in cross else "duplicate"
        lines.append(f"{kind}: {', '.join(group)}")
    lines += [
        f"too small to split: {t['class']} ({t['count']} images, need {MIN_IMAGES_PER_CLASS})"
        for t in report["too_small"]
    ]
    ignored = report["ignored_files"]
    loose = [path for path in ignored if is_image_name(Path(path))]
    if loose:
        shown = ", ".join(loose[:5]) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
        lines.append(f"ignored: {len(loose)} image(s) outside any class folder: {shown}")
    if len(ignored) > len(loose):
        lines.append(f"ignored {len(ignored) - len(loose)} non-image file(s)")
    return "\n".join(lines)


def _clean_names(
    root: Path, pattern: re.Pattern, infos: list[_FileInfo]
) -> dict[tuple[str | None, str], str]:
    names: dict[tuple[str | None, str], str] = {}
    if is_label_csv(root):  # the CSV's labels are its classes
        parts = [(None, root, sorted({info.cls for info in infos}))]
    else:
        parts = [(split, part, [f.name for f in class_dirs(part)]) for split, part in _parts(root)]
    for split, part, classes in parts:
        taken: dict[str, str] = {}
        for name in classes:
            folder = part / name
            new = pattern.sub("", name, count=1).strip()
            if not new:
                raise CnnlabError(f"{folder}: class name is empty once the prefix is removed")
            # Case-insensitive: "Dog" and "dog" would merge on macOS and Windows.
            if new.lower() in taken:
                raise CnnlabError(
                    f"{part}: classes {taken[new.lower()]!r} and {name!r} both "
                    f"clean to {new!r}; rename one or change --strip-prefix"
                )
            taken[new.lower()] = name
            names[(split, name)] = new
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
            # Prefer the copy in train, then val, then test (a leaked copy leaves the eval
            # set), then the original over a file named as a copy, then the shorter name.
            order = {name: k for k, name in enumerate(SPLIT_NAMES)}
            group = sorted(group, key=lambda i: (order.get(i.split, 0), *_copy_rank(i.path)))
            reason = f"duplicate of {group[0].rel} (kept)"
            drop = group[1:]
        for info in drop:
            left_out.append({"path": info.rel, "reason": reason})
            dropped.add(info.rel)
    kept = [i for i in infos if i.reason is None and i.rel not in dropped]
    return kept, sorted(left_out, key=lambda d: d["path"])


def _copy_rank(path: Path) -> tuple[bool, int, str]:
    """Sorts an original before its copies: "x.jpg" before "x (copy).jpg" and "x (1).jpg"."""
    return (bool(_COPY_NAME.search(path.stem)), len(path.name), path.name)


def _extension(info: _FileInfo) -> str:
    # Name the file after its content: a PNG saved as .jpg becomes .png.
    ext = _TORCHVISION_FORMATS.get(info.fmt) or _PIL_FORMATS.get(info.fmt.upper())
    return ext or info.path.suffix.lower().replace(".jpeg", ".jpg")


def clean_folder(
    src: Path, dst: Path, strip_prefix: str = DEFAULT_STRIP_PREFIX, images: Path | None = None
) -> dict:
    """Copy ``src`` into a new ``dst`` with clean class names and no bad or duplicate files.

    Class folders lose the ``strip_prefix`` regex (WordNet ids by default); files become
    ``<class>_<NNNN>.<ext>`` (extension from the content); unreadable files, all but the
    first of each duplicate group, and every copy of a duplicate spanning classes are left
    out. The returned report is also written to ``dst/clean_report.json``. ``src`` is only
    read; ``dst`` is built in a temporary folder beside it and renamed into place at the
    end, so a failure never leaves a half-written ``dst``. A label CSV as ``src`` (its
    files in ``images``) becomes a class-folder tree the same way.
    """
    try:
        pattern = re.compile(strip_prefix)
    except re.error as err:
        raise CnnlabError(f"--strip-prefix {strip_prefix!r} is not a valid regex: {err}") from None
    src, folder = _source(src, images)
    dst = require_new_folder(dst, "DST", [folder])
    infos, ignored, empty = _inspect(src, images)
    names = _clean_names(src, pattern, infos)
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
        write_json(staging / REPORT_NAME, report)
    return report


def clean_reasons(report: dict) -> str:
    """Why files were left out, counted: "2 unreadable, 3 duplicates, 1 duplicate across
    classes" ("" when none was). Every other reason is the image reader's refusal."""
    kinds: dict[str, int] = defaultdict(int)
    for item in report["left_out"]:
        reason = item["reason"]
        if reason.startswith("duplicate across classes"):
            kinds["duplicate across classes"] += 1
        elif reason.startswith("duplicate of"):
            kinds["duplicate"] += 1
        else:
            kinds["unreadable"] += 1
    plural = {"duplicate": "duplicates"}
    return ", ".join(f"{n} {plural.get(k, k) if n != 1 else k}" for k, n in kinds.items())


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
