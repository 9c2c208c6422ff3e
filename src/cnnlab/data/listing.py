"""Image files in folders: the one lister every part of cnnlab uses.

Folders are searched recursively and sorted; names starting with ``.`` (``.DS_Store``,
macOS ``._photo.jpg``) and ``__MACOSX`` folders are never images; only regular files count,
and symlinked folders are followed only when they stay inside the folder searched and do
not lead back into it. Reading a listed file is ``cnnlab.data.images``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cnnlab.errors import CnnlabError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
_SKIP_NAMES = frozenset({"__MACOSX"})


def visible(name: str) -> bool:
    """Whether a file or folder name can hold images (not hidden, not macOS metadata)."""
    return not name.startswith(".") and name not in _SKIP_NAMES


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``folder``, recursively, sorted by path.

    Only regular files are listed (not FIFOs, sockets or devices). A symlinked folder is
    followed when it resolves inside ``folder`` and to a folder not seen yet, so a link to
    another part of the disk or back up the tree (a loop) is passed over.
    """
    root = Path(folder).resolve()
    images, others = [], []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = os.stat(dirpath)
        seen.add((here.st_dev, here.st_ino))
        kept = []
        for name in sorted(dirnames):
            target = Path(dirpath, name)
            if not visible(name):
                continue
            if target.is_symlink():
                resolved = target.resolve()
                key = _inode(resolved)
                if key is None or key in seen or not resolved.is_relative_to(root):
                    continue
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = Path(dirpath, name)
            if visible(name) and is_regular_file(path):
                (images if is_image_name(path) else others).append(path)
    return sorted(images), sorted(others)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a folder, FIFO, socket, device or dangling
    link): the only kind listed, and the only kind opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a dangling link
        return False


def list_images(paths: Sequence[str | Path] | str | Path) -> tuple[list[Path], list[str]]:
    """Files named directly, plus the image files found under folders; and one error line
    ``"path: reason"`` for each path that gives nothing (missing, or a folder without
    images). A file reached twice (named, and inside a named folder) is listed once, where
    it first appears. Nothing is raised: callers go on with what was found."""
    files: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(file: Path) -> None:
        real = file.resolve()
        if real not in seen:
            seen.add(real)
            files.append(file)

    for path in map(Path, [paths] if isinstance(paths, str | Path) else paths):
        if path.is_dir():
            found = walk_files(path)[0]
            for file in found:
                add(file)
            if not found:
                errors.append(f"{path}: no image files in this folder")
        elif path.exists():
            add(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


def require_folder(root: Path | str) -> Path:
    """``root`` made absolute, or a CnnlabError when it is missing or not a folder."""
    root = Path(root)
    if not root.exists():
        raise CnnlabError(f"{root}: folder not found")
    if not root.is_dir():
        raise CnnlabError(f"{root}: not a folder")
    return root.absolute()
