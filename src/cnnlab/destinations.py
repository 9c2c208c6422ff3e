"""Where a command may write: the output rule every command that writes follows
(docs/safety.md), and the folder it fills in several steps.

A folder a command creates must be new or empty (``require_new_folder``), and is built
beside its destination and renamed into place (``staged_folder``), so an interrupted write
never leaves half of one; a file must not exist unless the user passed ``--overwrite`` and
is never one of the inputs (``check_targets``), and neither may lie inside the data
folders read or be a symbolic link (``check_destination``). Single files are written
atomically by ``cnnlab.files``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cnnlab.errors import CnnlabError


def check_destination(path: str | Path, flag: str, data: Iterable[Path] = ()) -> Path:
    """``path`` made absolute, or a CnnlabError when it is a symbolic link (a dangling
    one included: the write would land wherever it points) or lies inside one of the
    ``data`` folders (what the command reads, or what a later training would take as
    images); ``flag`` names the option that gave it, for the message."""
    path = Path(path).absolute()
    if path.is_symlink():
        raise CnnlabError(
            f"{path}: is a symbolic link (to {os.readlink(path)}); give {flag} a real path"
        )
    for folder in data:
        folder = Path(folder).absolute()
        if path.resolve().is_relative_to(folder.resolve()):
            raise CnnlabError(
                f"{path}: lies inside the data folder {folder}; choose another {flag}"
            )
    return path


def require_new_folder(dst: str | Path, flag: str = "DST", data: Iterable[Path] = ()) -> Path:
    """CnnlabError unless ``dst`` is missing or an empty folder, outside ``data`` and not
    a symbolic link (``check_destination``): user data is never overwritten."""
    dst = check_destination(dst, flag, data)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CnnlabError(f"{dst}: already exists and is not empty; choose a new folder")
    return dst


def current_umask() -> int:
    """The process's umask (read by setting it, then set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst`` that becomes ``dst`` when the block succeeds.

    ``dst`` must pass ``require_new_folder``; on any error the temporary folder is removed,
    so an interrupted write never leaves a half-filled ``dst``.
    """
    dst = require_new_folder(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(dst)) from None
    try:
        # mkdtemp makes it private (0700); the folder it becomes is an ordinary one, with
        # the permissions mkdir gives under the user's umask.
        staging.chmod(0o777 & ~current_umask())
        yield staging
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(staging, dst)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(error.errno, error.strerror, _renamed(error, staging, dst)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _renamed(error: OSError, staging: Path, dst: Path) -> str:
    """The file an error inside ``staged_folder`` is about, as the user will know it: the
    one written (a copy's destination, not its source), with the staging folder shown as
    the folder it would become; ``dst`` itself when the error names no file."""
    for name in (error.filename2, error.filename):
        if name is not None and Path(os.fsdecode(name)).is_relative_to(staging):
            return str(dst / Path(os.fsdecode(name)).relative_to(staging))
    return str(error.filename) if error.filename is not None else str(dst)


def output_stems(inputs: list[Path], out_dir: Path) -> dict[Path, Path]:
    """Where each input's outputs go: ``out_dir`` / the input's path below the folder the
    inputs share, without its suffix (``photo.png`` -> ``OUT/photo``; ``a/x.png`` and
    ``b/x.png`` -> ``OUT/a/x`` and ``OUT/b/x``). Two inputs that would still share a stem
    (``x.png`` and ``x.jpg``) are refused, so outputs never collide."""
    absolute = [path.absolute() for path in inputs]
    base = Path(os.path.commonpath([path.parent for path in absolute])) if absolute else Path()
    stems: dict[Path, Path] = {}
    owners: dict[Path, Path] = {}
    for path, full in zip(inputs, absolute, strict=True):
        stem = Path(out_dir) / full.relative_to(base).with_suffix("")
        if stem in owners:
            raise CnnlabError(
                f"{path} and {owners[stem]} would write the same output {stem}.png; rename one"
            )
        owners[stem] = path
        stems[path] = stem
    return stems


def check_targets(
    targets: list[Path],
    inputs: list[Path],
    overwrite: bool,
    flag: str = "--out",
    data: Iterable[Path] = (),
) -> None:
    """CnnlabError before anything is written when a target is one of the inputs (always
    refused), a symbolic link or inside one of the ``data`` folders (``check_destination``),
    a folder, or an existing file (refused unless ``overwrite``); ``flag`` is the option
    that named the target, for the message."""
    sources = {path.resolve() for path in inputs}
    data = list(data)
    for target in targets:
        if target.resolve() in sources:
            raise CnnlabError(
                f"{target}: an output would replace this input; choose another {flag}"
            )
        check_destination(target, flag, data)
        if target.is_dir():
            raise CnnlabError(f"{target}: is a folder; {flag} takes a file name")
        if target.exists() and not overwrite:
            raise CnnlabError(
                f"{target}: already exists; choose another {flag} or pass --overwrite"
            )
