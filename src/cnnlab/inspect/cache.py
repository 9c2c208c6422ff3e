"""``cnnlab models``: one row per registered model (parameters, MACs, sizes), computed once
and kept in the user cache (``cache_dir``), keyed by a SHA-256 of the code that computes
them (models/, inspect/, registry.py), torch's version and the pattern, and shown as a rich
table.

Reading the cache imports neither torch nor the models (``import torch`` alone takes about
2 s on the 2-core machine): they are imported only when a table must be computed."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_text
from cnnlab.tables import Column, FittedTable, fit_table

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


def torch_version() -> str:
    """The installed torch's version, read from its metadata (no ``import torch``)."""
    return version("torch")


def table_key(pattern: str | None = None) -> str:
    """SHA-256 of the sources (names and bytes), torch's version and ``pattern``."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sources():
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(f"torch {torch_version()}\0pattern {pattern!r}".encode())
    return digest.hexdigest()


def cached_model_table_rows(
    pattern: str | None = None, progress: TextIO | None = None
) -> list[dict[str, Any]]:
    """``model_table_rows(pattern)``, read from the cache when the key matches (or filtered
    from the whole table when that is kept); otherwise computed (with a line on
    ``progress``, default stderr) and stored for the next call."""
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
    whole = stored.get(table_key(None)) if pattern is not None else None
    if isinstance(whole, list):
        names = set(names_matching([row["name"] for row in whole], pattern))
        return [row for row in whole if row["name"] in names]
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


def matching_models(pattern: str | None = None) -> list[str]:
    """Registered names matching ``pattern``: a glob (``resnet*``), else a part of the name
    (``resnet``); every name without one."""
    from cnnlab.models.factory import list_models

    return names_matching(list_models(), pattern)


def names_matching(names: list[str], pattern: str | None) -> list[str]:
    """``names`` matching ``pattern`` as ``matching_models`` reads it."""
    if pattern is None:
        return names
    if any(c in pattern for c in "*?["):
        found = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    else:
        found = [name for name in names if pattern in name]
    if not found:
        raise CnnlabError(f"no registered model matches {pattern!r} (`cnnlab models` lists all)")
    return found


def model_table_rows(pattern: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model (matching ``pattern``, see ``matching_models``): name,
    family, task, params, MACs, FLOPs (``flops.FLOPS_LEGEND``), sizes.

    Parameters are counted at the default settings (with as many input channels as the
    natural input has) and MACs at the model's natural input size. Models are built on the
    meta device where they can be (``summarize_spec``).
    """
    from cnnlab.inspect.specs import summarize_spec
    from cnnlab.models.factory import model_info

    rows = []
    for name in matching_models(pattern):
        info = model_info(name)
        _, summary, _ = summarize_spec(name, depth=0)
        rows.append(
            {
                "name": name,
                "family": info.family,
                "task": info.task,
                "params": summary.total_params,
                "macs": summary.total_macs,
                "flops": summary.total_flops,
                "input_size": list(info.input_size),
                "min_size": info.min_size,
            }
        )
    return rows


# The columns of ``models_table``, and the order in which they give way at narrow widths.
_MODEL_COLUMNS = (
    Column("name", "left"),
    Column("family", "left", drop=4),
    Column("task", "left", drop=2),
    Column("params"),
    Column("MACs"),
    Column("FLOPs", drop=3),
    Column("input", "left", drop=1),
    Column("min input"),
)


def models_table(rows: list[dict[str, Any]], width: int | None = None) -> FittedTable:
    """``model_table_rows`` as a rich table within ``width`` columns (``tables.fit_table``)."""
    cells = [
        (
            row["name"],
            row["family"],
            row["task"],
            f"{row['params']:,}",
            f"{row['macs'] / 1e9:.2f} G",
            f"{row['flops'] / 1e9:.2f} G" if "flops" in row else "-",
            "x".join(str(d) for d in row["input_size"]),
            str(row["min_size"]),
        )
        for row in rows
    ]
    return fit_table("cnnlab models", _MODEL_COLUMNS, cells, width)
