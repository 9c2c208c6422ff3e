"""Saving and loading runs: safetensors weights, JSON/YAML metadata, a torch resume state.

Every write goes to a temporary file in the same folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash, a full disk or a
SIGKILL mid-write leaves either the old file or the new one, never half of one.
Nothing here unpickles arbitrary objects: the resume state loads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cnnlab.errors import CnnlabError

MODEL_JSON = "model.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open (not mkstemp, which makes 0600 files) so the umask sets the permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            # Without fsync a power cut after the rename could still leave an empty file.
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as block-style YAML in insertion order, atomically."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is a CnnlabError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnlabError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CnnlabError(f"{path}: not valid JSON ({error})") from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing or malformed file is a CnnlabError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnlabError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CnnlabError(f"{path}: not valid YAML ({error})") from None


def save_weights(
    path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None
) -> None:
    """Write ``model.state_dict()`` as safetensors (contiguous CPU copies), atomically."""
    # channels_last parameters are not contiguous in the default layout safetensors stores.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a safetensors state_dict into ``model`` strictly.

    A file for another number of classes, another architecture or not a weight file at all
    is a CnnlabError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"{path}: weight file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CnnlabError(f"{path}: not a readable safetensors file ({error})") from None
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise CnnlabError(
            f"{path}: weights do not fit this model (missing {_few(missing)}; "
            f"unexpected {_few(unexpected)})"
        )
    for key, wanted in target.items():
        got = state[key].shape
        if got != wanted.shape:
            raise CnnlabError(f"{path}: {_shape_problem(key, got, wanted.shape, target)}")
    model.load_state_dict(state)


def _shape_problem(key: str, got: torch.Size, wanted: torch.Size, target: dict) -> str:
    # The classifier is the last weight of the state_dict in every cnnlab model; a first
    # dimension mismatch there means the file was trained on another number of classes.
    last_weight = [k for k in target if k.endswith(".weight")][-1]
    head = key.rsplit(".", 1)[0] == last_weight.rsplit(".", 1)[0]
    if head and got[1:] == wanted[1:]:
        return f"holds weights for {got[0]} classes but the model has {wanted[0]}"
    return f"tensor {key} has shape {list(got)}, the model expects {list(wanted)}"


def _few(keys: list[str], limit: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty when none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def save_state(path: str | Path, state: dict) -> None:
    """``torch.save`` a resume state (tensors and plain Python values only), atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str | Path) -> dict:
    """Load a resume state with ``weights_only=True``; failures name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CnnlabError(f"{path}: file not found") from None
    except Exception as error:  # any unpickling failure is the file's fault
        raise CnnlabError(f"{path}: not a readable resume state ({error})") from None


def save_model_json(run_dir: str | Path, meta: dict) -> None:
    """Write ``RUN/model.json``: what is needed to rebuild and feed the model."""
    write_json(Path(run_dir) / MODEL_JSON, meta)


def read_model_json(run_dir: str | Path) -> dict:
    """Read ``RUN/model.json`` of a run folder."""
    return read_json(require_run_dir(run_dir) / MODEL_JSON)


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a cnnlab run folder (it holds model.json)."""
    return (Path(path) / MODEL_JSON).is_file()


def require_run_dir(path: str | Path) -> Path:
    """``path`` as a Path, or a CnnlabError when it is not a run folder."""
    path = Path(path)
    if not is_run_dir(path):
        raise CnnlabError(f"{path} is not a cnnlab run folder (no {MODEL_JSON})")
    return path
