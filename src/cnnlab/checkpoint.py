"""A run folder's model files: safetensors weights, ``model.json`` and the resume state.

Nothing here unpickles arbitrary objects: weights are safetensors, metadata is JSON, and
the resume state (``last.pt``) loads with ``torch.load(..., weights_only=True)``. Every
file is written atomically (``cnnlab.files``).
"""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.files import atomic_write_bytes, read_json, write_json
from cnnlab.registry import classifier_modules
from cnnlab.tasks import TASKS

MODEL_JSON = "model.json"


# --- weights ---------------------------------------------------------------------------


def save_weights(
    path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None
) -> None:
    """Write ``model.state_dict()`` as safetensors (contiguous CPU copies), atomically."""
    # channels_last parameters are not contiguous in the default layout safetensors stores.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


INITIAL_WEIGHTS = "initial.safetensors"  # the first convolution before training


def save_initial_filters(run_dir: Path, model: nn.Module) -> None:
    """Keep the first convolution's weights as training starts (``INITIAL_WEIGHTS``), so
    that ``cnnlab features --filters`` can draw the trained kernels beside them; a model
    whose registry entry names no first convolution keeps nothing."""
    from cnnlab.registry import info_of

    info = info_of(model)
    if info is None or info.first_conv is None:
        return
    try:
        weight = model.get_submodule(info.first_conv).weight
    except AttributeError:
        return
    state = {f"{info.first_conv}.weight": weight.detach().to("cpu").contiguous()}
    atomic_write_bytes(Path(run_dir) / INITIAL_WEIGHTS, save(state))


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a safetensors state_dict into ``model`` strictly.

    A file for another number of classes, another architecture or not a weight file at all
    is a CnnlabError naming the file; the shapes are compared from the file's header
    (``check_weights_fit``) before its tensors are read.
    """
    path = Path(path)
    check_weights_fit(path, model)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CnnlabError(f"{path}: not a readable safetensors file ({error})") from None
    model.load_state_dict(state)


def weight_shapes(path: str | Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: list(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CnnlabError(f"{path}: not a readable safetensors file ({error})") from None


def check_weights_fit(path: str | Path, model: nn.Module) -> None:
    """CnnlabError naming ``path`` unless its tensors are exactly ``model``'s, by name and
    shape, read from the file's header. ``model`` may live on the meta device, so a model
    file that asks for gigabytes is refused before any of them is allocated."""
    path = Path(path)
    shapes = weight_shapes(path)
    target = model.state_dict()
    missing = [k for k in target if k not in shapes]
    unexpected = [k for k in shapes if k not in target]
    if missing or unexpected:
        raise CnnlabError(
            f"{path}: weights do not fit this model (missing {_few(missing)}; "
            f"unexpected {_few(unexpected)})"
        )
    outputs = _class_outputs(model, target)
    for key, wanted in target.items():
        got = shapes[key]
        if got == list(wanted.shape):
            continue
        # A classifier's output layer that differs only in its first dimension was trained
        # for another number of classes.
        if key.rsplit(".", 1)[0] in outputs and got[1:] == list(wanted.shape[1:]):
            raise CnnlabError(
                f"{path}: holds weights for {got[0]} classes but the model has {wanted.shape[0]}"
            )
        raise CnnlabError(
            f"{path}: tensor {key} has shape {got}, the model expects {list(wanted.shape)}"
        )


def _class_outputs(model: nn.Module, state: dict) -> set[str]:
    """The modules that output class scores: the last weighted layer of each of the
    model's classifier modules (``ModelInfo.classifier``)."""
    outputs = set()
    for prefix in classifier_modules(model):
        weights = [k for k in state if k.startswith(f"{prefix}.") and k.endswith(".weight")]
        if weights:
            outputs.add(weights[-1].rsplit(".", 1)[0])
    return outputs


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


# --- resume state --------------------------------------------------------------------


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
        # torch's own message spans lines and suggests weights_only=False, which would run
        # the code the file carries: only what the file holds is reported, in one line.
        found = _PICKLED_GLOBAL.search(str(error))
        if found:
            reason = f"it holds a Python object ({found.group(1)}) that cnnlab never loads"
        else:
            lines = [
                line.strip()
                for line in str(error).splitlines()
                if line.strip() and not _TORCH_ADVICE.search(line)
            ]
            reason = lines[0] if lines else type(error).__name__
        raise CnnlabError(f"{path}: not a readable resume state ({reason})") from None


# How torch's weights-only unpickler names the object it refused.
_PICKLED_GLOBAL = re.compile(r"(?:GLOBAL|global) ([\w.]+)")
# The lines of torch's message that give advice rather than the cause.
_TORCH_ADVICE = re.compile(r"weights_only|Weights only load failed|Check the documentation")


# --- model.json ----------------------------------------------------------------------


@dataclass
class ModelMeta:
    """``RUN/model.json``: what rebuilds the model and feeds it, for every task."""

    task: str  # "classify", "segment" or "detect"
    architecture: str  # registered model name
    model_args: dict  # create_model keyword arguments (num_classes, in_channels, ...)
    classes: list[str]
    input_size: list[int]  # [C, H, W] the model was trained at
    mean: list[float]
    std: list[float]
    cnnlab_version: str = "unknown"
    # Multi-label classification: each label's decision threshold on its sigmoid score
    # (fitted on the validation split); None for single-label (softmax) classification.
    thresholds: list[float] | None = None

    @classmethod
    def from_json(cls, data: object, source: Path | str) -> ModelMeta:
        """Validate a model.json document; any problem is one line naming ``source``."""
        if not isinstance(data, dict):
            raise CnnlabError(f"{source}: expected a JSON object")
        data = {"task": "classify", **data}  # files from before segmentation had no task
        required = ("architecture", "model_args", "classes", "input_size", "mean", "std")
        missing = [key for key in required if key not in data]
        if missing:
            raise CnnlabError(f"{source}: missing {', '.join(missing)}")
        if not isinstance(data["task"], str) or data["task"] not in TASKS:
            raise CnnlabError(f"{source}: unknown task {data['task']!r} ({', '.join(TASKS)})")
        if not isinstance(data["architecture"], str):
            raise CnnlabError(f"{source}: architecture must be a model name")
        if not isinstance(data["model_args"], dict):
            raise CnnlabError(f"{source}: model_args must be a JSON object")
        classes = data["classes"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise CnnlabError(f"{source}: classes must be a non-empty list of names")
        size = data["input_size"]
        if not (_ints(size) and len(size) == 3 and size[0] in (1, 3) and min(size) >= 1):
            raise CnnlabError(f"{source}: input_size must be [C, H, W] with C 1 or 3")
        for key in ("mean", "std"):
            values = data[key]
            if not (_numbers(values) and len(values) == size[0]):
                raise CnnlabError(f"{source}: {key} must be {size[0]} number(s)")
        if any(v <= 0 for v in data["std"]):
            raise CnnlabError(f"{source}: std must be positive")
        num_classes = data["model_args"].get("num_classes")
        if num_classes is not None and num_classes != len(classes):
            raise CnnlabError(
                f"{source}: num_classes is {num_classes} but {len(classes)} classes are listed"
            )
        thresholds = data.get("thresholds")
        if thresholds is not None and not (
            _numbers(thresholds) and len(thresholds) == len(classes)
        ):
            raise CnnlabError(f"{source}: thresholds must be {len(classes)} number(s)")
        extra = ("task", "cnnlab_version", "thresholds")
        known = {key: data[key] for key in (*required, *extra) if key in data}
        return cls(**known)

    def to_json(self) -> dict:
        """model.json's document; ``thresholds`` only in a multi-label run's."""
        data = asdict(self)
        if data["thresholds"] is None:
            del data["thresholds"]
        return data


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )


def _numbers(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


def save_model_json(run_dir: str | Path, meta: ModelMeta) -> None:
    """Write ``RUN/model.json``; it goes last when a run starts: it marks a run folder."""
    write_json(Path(run_dir) / MODEL_JSON, meta.to_json())


def read_model_json(run_dir: str | Path) -> ModelMeta:
    """Read and validate ``RUN/model.json`` of a run folder."""
    source = require_run_dir(run_dir) / MODEL_JSON
    return ModelMeta.from_json(read_json(source), source)


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a cnnlab run folder (it holds model.json)."""
    return (Path(path) / MODEL_JSON).is_file()


def require_run_dir(path: str | Path) -> Path:
    """``path`` as a Path, or a CnnlabError when it is not a run folder."""
    path = Path(path)
    if not is_run_dir(path):
        raise CnnlabError(f"{path} is not a cnnlab run folder (no {MODEL_JSON})")
    return path


# model.json's model_args never name files to load: best.safetensors holds every weight.
_FILE_ARGS = ("weights", "backbone_weights")


def check_run_files(run_dir: str | Path, meta: ModelMeta, config: dict | None = None) -> None:
    """CnnlabError naming the file at fault unless a run's files agree with each other:
    ``config`` (its config.yaml, when given) with model.json on the model, image size and
    channels; model.json's input size with its model arguments, within the image reader's
    pixel limit; and best.safetensors' tensors, where it exists, with the model model.json
    describes.

    All of it is checked on file headers and a model built on the meta device, so an
    edited ``img_size: 100000`` is refused before a gigabyte is allocated.
    """
    from cnnlab.data.images import MAX_PIXELS_ENV, max_pixels
    from cnnlab.models.factory import create_model, model_info

    run_dir = Path(run_dir)
    model_json = run_dir / MODEL_JSON
    channels, height, width = meta.input_size
    if height * width > max_pixels():
        raise CnnlabError(
            f"{model_json}: input_size {meta.input_size} is above the limit of"
            f" {max_pixels():,} pixels ({MAX_PIXELS_ENV})"
        )
    args = meta.model_args
    named = [key for key in _FILE_ARGS if key in args]
    if named:
        raise CnnlabError(f"{model_json}: model_args may not name files to load ({named[0]})")
    if args.get("in_channels", channels) != channels:
        raise CnnlabError(
            f"{model_json}: model_args in_channels {args['in_channels']!r} disagrees with"
            f" input_size {meta.input_size}"
        )
    try:
        info = model_info(meta.architecture)
    except CnnlabError as error:
        raise CnnlabError(f"{model_json}: {error}") from None
    if info.task != meta.task:
        raise CnnlabError(
            f"{model_json}: {meta.architecture} is a {info.task} model but the file says"
            f" {meta.task}"
        )
    if info.takes_img_size and args.get("img_size", height) not in (height, width):
        raise CnnlabError(
            f"{model_json}: model_args img_size {args['img_size']!r} disagrees with"
            f" input_size {meta.input_size}"
        )
    if config is not None:
        _check_config(run_dir / "config.yaml", config, meta)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            shell = create_model(meta.architecture, **args)
    except CnnlabError as error:  # arguments the model does not take
        raise CnnlabError(f"{model_json}: {error}") from None
    except (ValueError, RuntimeError, OverflowError) as error:  # values it cannot take
        raise CnnlabError(f"{model_json}: model_args do not build a model ({error})") from None
    weights = run_dir / "best.safetensors"
    if weights.is_file():  # (none yet when a run stopped in its first epoch)
        check_weights_fit(weights, shell)


def _check_config(source: Path, config: dict, meta: ModelMeta) -> None:
    """CnnlabError unless config.yaml's model, img_size, in_channels and model_args are
    those model.json records."""
    recorded = {
        "model": meta.architecture,
        "in_channels": meta.input_size[0],
        "img_size": meta.input_size[1],
    }
    for key, expected in recorded.items():
        value = config.get(key)
        if value is not None and value != expected:
            raise CnnlabError(
                f"{source}: {key} is {value!r} but {MODEL_JSON} says {expected!r}"
                " (the files of this run were edited apart)"
            )
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CnnlabError(f"{source}: model_args must be a mapping")
    for key, value in model_args.items():
        if key in meta.model_args and meta.model_args[key] != value:
            raise CnnlabError(
                f"{source}: model_args {key} is {value!r} but {MODEL_JSON} says"
                f" {meta.model_args[key]!r} (the files of this run were edited apart)"
            )
