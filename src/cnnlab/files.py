"""Writing files so that nothing is ever half-written or lost, and reading JSON/YAML safely.

Every write goes to a temporary file in the same folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash, a full disk or a
SIGKILL mid-write leaves either the old file or the new one, never half of one. A failed
write names the file the user asked for (``os_error_line``), never a temporary one. Where
a command may write, and the folders it fills in several steps, are ``cnnlab.destinations``.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import secrets
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from cnnlab.errors import CnnlabError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open (not mkstemp, which makes 0600 files) so the umask sets the permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            # Without fsync a power cut after the rename could still leave an empty file.
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        discard(tmp)
        # The message names the file the user asked for, not the temporary one.
        raise OSError(error.errno, error.strerror, str(path)) from None
    except BaseException:
        discard(tmp)
        raise


def discard(path: Path) -> None:
    """Remove a temporary file of ours if it is there; a file system that refuses even
    that (read-only: unlink fails before it looks) leaves nothing to remove anyway."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a NaN or infinity as null: see
    ``json_text``)."""
    atomic_write_text(path, json_text(obj)[0] + "\n")


def json_text(document: Any, indent: int | None = 2) -> tuple[str, int]:
    """``document`` as JSON text, and how many of its numbers were NaN or infinite.

    JSON has no NaN or Infinity (Python's ``json`` writes them as bare words, which other
    readers, and ``read_json``, refuse), so each becomes null; the count lets the caller
    warn that a value was lost.
    """
    replaced = [0]

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            replaced[0] += 1
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    text = json.dumps(finite(document), indent=indent, allow_nan=False)
    return text, replaced[0]


def write_yaml(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as block-style YAML in insertion order, atomically."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents; a missing file, or one that is not UTF-8 text, is a
    CnnlabError naming it (and the first byte that is not)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CnnlabError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise CnnlabError(
            f"{path}: not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x})"
        ) from None
    except OSError as error:
        raise CnnlabError(f"{path}: cannot read file: {error.strerror or error}") from None


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a CnnlabError naming it."""
    text = read_text(path)
    try:
        # Python reads NaN and Infinity, which JSON does not have; refuse them.
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as error:
        where = (
            f" at line {error.lineno} column {error.colno}"
            if isinstance(error, json.JSONDecodeError)
            else ""
        )
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise CnnlabError(f"{path}: not valid JSON ({reason}{where})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# The most values (mapping keys and values, list items, scalars) a YAML file may stand for
# once its aliases are expanded. Aliases refer to a value instead of copying it, so a 1 KB
# file nesting them ("billion laughs") stands for 10^9 values; cnnlab's own files never
# use one, and a config.yaml holds about a hundred values.
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing or malformed file, one nesting too deep, or one whose
    aliases expand past ``MAX_YAML_VALUES`` values is a CnnlabError naming it."""
    text = read_text(path)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # (refuses control characters already)
        node = loader.get_single_node()
        if node is None:
            return None
        _count_yaml_values(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise CnnlabError(f"{path}: not valid YAML ({reason})") from None
    except RecursionError:
        raise CnnlabError(f"{path}: not valid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def _count_yaml_values(root: yaml.Node, path: str | Path) -> None:
    """CnnlabError when the node tree, with every alias expanded, holds more than
    ``MAX_YAML_VALUES`` values or refers back into itself. Each distinct node is counted
    once and its total reused, so the check takes time linear in the file."""
    totals: dict[int, int] = {}
    open_nodes: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in totals:
            return totals[key]
        if key in open_nodes:
            raise CnnlabError(f"{path}: a YAML alias refers to the value that holds it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(count(k) + count(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(count(item) for item in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_VALUES:
            raise CnnlabError(
                f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values"
            )
        totals[key] = total
        return total

    count(root)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself for the block (nothing is created
    in it), waiting for other holders: processes that read, change and rewrite a file
    they share there (export.json) take turns, and none loses the others' entries."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


LOCK_NAME = ".lock"  # in a run folder while a process owns it (run_lock)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` for the block, or a CnnlabError naming the process that does.

    RUN/.lock holds the owner's pid and host under an exclusive ``flock``: the kernel
    releases it when the owner exits, however it dies (SIGKILL included), so a lock left
    by a dead process is free again and needs no guessing. Leftover temporary files of a
    write that was killed half-way are removed once the lock is held.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CnnlabError(f"{run_dir} is in use by {holder}; wait for it to finish") from None
        # The owner before us removes the file as it leaves: make sure ours is still it.
        if _same_file(fd, lock):
            break
        os.close(fd)
    try:
        with naming(lock):
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        for leftover in run_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        discard(lock)  # the folder may be gone (moved away mid-run) or read-only by now
        os.close(fd)  # closing releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an OSError raised in the block without a file name (``os.write`` on a
    descriptor) ``path``'s, so the one line the user sees says where."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


# What the user can do about a failed write, by errno (os_error_line).
_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write to a folder you own",
    errno.EPERM: "operation not permitted; write to a folder you own",
    errno.ENOENT: "no such file or folder (moved or deleted while cnnlab ran?)",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder; name a file",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error; the disk may be failing",
}


def os_error_line(error: OSError) -> str:
    """One line for a file-system error: the path (both, for a rename), then what went
    wrong and what to do (``_ADVICE``), else the system's own words."""
    names = [os.fsdecode(n) for n in (error.filename, error.filename2) if n is not None]
    reason = _ADVICE.get(error.errno or 0) or error.strerror or str(error)
    return f"{' -> '.join(names)}: {reason}" if names else reason


# A cell a spreadsheet would run as a formula starts with one of these (OWASP's CSV
# injection advice); such a cell is written after a single quote, which shows it as text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def display_name(text: str) -> str:
    """``text`` with each byte of a file name that is not UTF-8 (Python reads one as a lone
    surrogate, ``\\udcff``) written as ``\\xff``: text that prints and saves as UTF-8."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def spreadsheet_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as it is: text that would start a formula is
    prefixed with a single quote (numbers are left alone: -1.5 is a number, not a formula),
    and bytes that are not UTF-8 are written as ``\\xNN``."""
    if not isinstance(value, str):
        return value
    value = display_name(value)
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text of ``header`` and ``rows``, each text cell made safe by ``spreadsheet_cell``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_cell(cell) for cell in header])
    writer.writerows([spreadsheet_cell(cell) for cell in row] for row in rows)
    return buffer.getvalue()


_HASH_CHUNK = 1 << 20  # bytes read at a time


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
