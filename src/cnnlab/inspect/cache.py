"""``cnnlab models``' figures (parameters, MACs) computed once and kept in the user cache
(``cache_dir``), keyed by a SHA-256 of the code that computes them (models/, inspect/,
registry.py), torch's version and the pattern."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from cnnlab.files import atomic_write_text

CACHE_FILE = "models-table.json"
KEEP = 8  # keys kept in the file: a few versions or patterns, never an ever-growing file


def cache_dir() -> Path:
    """Where cnnlab keeps what it can compute again: ``$CNNLAB_CACHE``, else
    ``$XDG_CACHE_HOME/cnnlab`` (default ``~/.cache/cnnlab``)."""
    if os.environ.get("CNNLAB_CACHE"):
        return Path(os.environ["CNNLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnlab"


def sources() -> list[Path]:
    """The files whose code decides the table's figures."""
    package = Path(__file__).resolve().parents[1]
    files = [package / "registry.py"]
    for folder in ("models", "inspect"):
        files += sorted((package / folder).rglob("*.py"))
    return files


def table_key(pattern: str | None = None) -> str:
    """SHA-256 of the sources (names and bytes), torch's version and ``pattern``."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sources():
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(f"torch {torch.__version__}\0pattern {pattern!r}".encode())
    return digest.hexdigest()


def cached_model_table_rows(
    pattern: str | None = None, progress: TextIO | None = None
) -> list[dict[str, Any]]:
    """``model_table_rows(pattern)``, read from the cache when the key matches; otherwise
    computed (with a line on ``progress``, default stderr) and stored for the next call."""
    from cnnlab.inspect.render import matching_models, model_table_rows

    key = table_key(pattern)
    path = cache_dir() / CACHE_FILE
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    if isinstance(stored.get(key), list):
        return stored[key]
    names = matching_models(pattern)
    print(
        f"counting parameters and MACs of {len(names)} models (once: kept in {path})",
        file=progress or sys.stderr,
        flush=True,
    )
    rows = model_table_rows(pattern)
    stored.pop(key, None)
    stored[key] = rows
    stored = dict(list(stored.items())[-KEEP:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(stored))
    except OSError:  # a read-only home: the table is still right, only not kept
        pass
    return rows
