"""Running an exported model (``cnnlab export``): its metadata, and an ONNX Runtime session
or a loaded ``.pt2`` program behind the calls a task makes of a model.

``ExportedModel`` is an ``nn.Module`` so that a task's ``predict`` and ``evaluate`` run it
unchanged: ``model(x)`` returns what the exported graph returns for the batch (logits, a
YOLOv1 grid), and a detector's ``model.detect(images, limits)`` decodes it as the detector
class that exported it says (``Detector.decode_graph``: YOLOv1's grid decoding, or Faster
R-CNN's detections filtered by score). A graph exported for one image per call (no
``--dynamic-batch``) is called once per image.

Every exported file carries ``METADATA`` (ONNX ``metadata_props``, one JSON document per
key; inside a ``.pt2`` the same keys as ``cnnlab.json``), so it is usable without the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError

if TYPE_CHECKING:
    from cnnlab.models.detection.contract import DetectLimits

# Each format's default file name in the run folder; its loader is ``LOADERS`` below
# (``cnnlab export --int8``'s file is an ONNX one).
FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "onnx-int8": "model.int8.onnx"}
PT2_METADATA = "cnnlab.json"  # the metadata's name among a .pt2 archive's extra files
METADATA = (
    "task",  # "classify", "segment" or "detect"
    "architecture",  # the registered model name
    "classes",  # class names, in output order
    "input_size",  # [C, H, W] the model was trained at (H, W dynamic where "dynamic" says)
    "mean",  # normalisation: input = (pixel / 255 - mean) / std per channel
    "std",
    "output",  # "logits", "yolov1_grid" or "detections" (see OUTPUTS)
    "dynamic",  # which input axes are dynamic: a subset of ["batch", "height", "width"]
    "decoding",  # for detectors: how to turn the outputs into boxes, in words
    "detect",  # for detectors: the "boxes" per YOLOv1 cell, or the limits built in
    "thresholds",  # multi-label classifiers: a label is on when sigmoid(logit) > its threshold
    "weights_sha256",  # of the run's best.safetensors the file was exported from
    "cnnlab_version",
)
OUTPUTS = {
    "logits": "classification (N, K) or segmentation (N, K, H, W) logits",
    "yolov1_grid": "YOLOv1's raw (N, S, S, B*5 + C) grid",
    "detections": "boxes (M, 4) xyxy in input pixels, scores (M,), labels (M,) 0-based",
}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The cnnlab metadata of an exported ``.onnx`` or ``.pt2`` file (see ``METADATA``)."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"{path}: file not found")
    try:
        if path.suffix == ".pt2":
            files = {PT2_METADATA: ""}
            torch.export.load(path, extra_files=files)
            return json.loads(files[PT2_METADATA])
        import onnx

        props = onnx.load(str(path), load_external_data=False).metadata_props
        found = {prop.key: json.loads(prop.value) for prop in props if prop.key in METADATA}
    except Exception as error:  # any unreadable file is the file's fault
        raise CnnlabError(f"{path}: not an exported cnnlab model ({_first_line(error)})") from None
    if "task" not in found:
        raise CnnlabError(f"{path}: has no cnnlab metadata; export it with `cnnlab export`")
    _check_metadata(found, path)
    return found


# The output tensors each kind of graph returns, and the rank of the first one: a
# classifier's (N, K) or a segmenter's (N, K, H, W) logits, YOLOv1's grid, or boxes.
_OUTPUT_COUNTS = {"logits": 1, "yolov1_grid": 1, "detections": 3}
_LOGIT_RANKS = {"classify": 2, "segment": 4, "detect": 4}


def _check_metadata(metadata: dict[str, Any], path: Path) -> None:
    """CnnlabError naming ``path`` unless the metadata's fields that decide how the graph
    is called hold what cnnlab writes."""
    size = metadata.get("input_size")
    sized = isinstance(size, list) and len(size) == 3
    if not sized or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise CnnlabError(f"{path}: metadata input_size must be [C, H, W], got {size!r}")
    if size[0] not in (1, 3) or min(size) < 1:
        raise CnnlabError(f"{path}: metadata input_size must be [C, H, W], got {size!r}")
    if metadata.get("output") not in OUTPUTS:
        raise CnnlabError(
            f"{path}: metadata output must be one of {', '.join(OUTPUTS)},"
            f" got {metadata.get('output')!r}"
        )
    dynamic = metadata.get("dynamic", [])
    if not isinstance(dynamic, list) or not set(dynamic) <= {"batch", "height", "width"}:
        raise CnnlabError(f"{path}: metadata dynamic must list batch, height or width")
    classes = metadata.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise CnnlabError(f"{path}: metadata classes must be a non-empty list of names")


def _check_graph(session: Any, metadata: dict[str, Any], path: Path) -> None:
    """CnnlabError naming ``path`` unless the ONNX graph takes one float (N, C, H, W) input
    of the metadata's channels (and size, where fixed) and returns the outputs its
    metadata's ``output`` says, so that a file carrying a run's metadata over another graph
    is refused when it is loaded rather than failing inside ONNX Runtime."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    channels, height, width = metadata["input_size"]
    if len(inputs) != 1:
        raise CnnlabError(f"{path}: the graph takes {len(inputs)} inputs; cnnlab gives it one")
    (graph_input,) = inputs
    shape = graph_input.shape
    if graph_input.type != "tensor(float)" or len(shape) != 4:
        raise CnnlabError(
            f"{path}: the graph's input is {graph_input.type} {shape};"
            f" cnnlab gives it float (N, {channels}, H, W)"
        )
    for axis, (got, expected) in enumerate(zip(shape[1:], (channels, height, width), strict=True)):
        dynamic = axis > 0 and ("height" if axis == 1 else "width") in metadata["dynamic"]
        if isinstance(got, int) and got != expected and not dynamic:
            raise CnnlabError(
                f"{path}: the graph's input is {shape} but its metadata says input_size"
                f" {metadata['input_size']}"
            )
    wanted = _OUTPUT_COUNTS[metadata["output"]]
    if len(outputs) != wanted:
        raise CnnlabError(
            f"{path}: the graph returns {len(outputs)} outputs; {metadata['output']} is {wanted}"
        )
    first = outputs[0]
    rank = _LOGIT_RANKS.get(metadata["task"], 4) if metadata["output"] == "logits" else None
    rank = 4 if metadata["output"] == "yolov1_grid" else 2 if rank is None else rank
    if first.type != "tensor(float)" or len(first.shape) != rank:
        raise CnnlabError(
            f"{path}: the graph's output is {first.type} {first.shape}; {metadata['output']}"
            f" is {OUTPUTS[metadata['output']]}"
        )
    classes = first.shape[1] if metadata["output"] == "logits" else None
    if isinstance(classes, int) and classes != len(metadata["classes"]):
        raise CnnlabError(
            f"{path}: the graph scores {classes} classes but its metadata lists"
            f" {len(metadata['classes'])}"
        )


class ExportedModel(nn.Module):
    """An exported graph behind ``model(x)`` and, for detectors, ``model.detect`` (the
    inference half of ``cnnlab.models.detection.Detector``: it takes no proposals).

    ``run`` maps one float32 CPU batch (N, C, H, W) to the graph's output tensors; it is
    called with ``batch`` images at a time when the graph was exported for a fixed batch.
    """

    proposal_settings = None  # an exported detector finds its own boxes

    def __init__(self, run: Callable[[Tensor], list[Tensor]], metadata: dict, name: str) -> None:
        super().__init__()
        self._run, self.metadata, self.name = run, metadata, name
        dynamic = metadata.get("dynamic", [])
        self.batch = None if "batch" in dynamic else 1
        self.size = None if "height" in dynamic else tuple(metadata["input_size"][1:])
        self.decoder = None  # the detector class that decodes this graph's outputs
        if metadata["output"] != "logits":  # (logits need none, nor the detectors' imports)
            # The package, not its contract module: importing it defines every detector.
            from cnnlab.models.detection import graph_decoder

            self.decoder = graph_decoder(metadata["output"])

    def outputs(self, x: Tensor) -> list[Tensor]:
        """The graph's outputs for a batch (N, C, H, W), one call per image when the graph
        takes one."""
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            height, width = self.size
            raise CnnlabError(
                f"{self.name} takes {height}x{width} inputs only, got"
                f" {x.shape[-2]}x{x.shape[-1]} (export it again to take other sizes)"
            )
        x = x.detach().to("cpu", torch.float32).contiguous()  # the graph's NCHW layout
        if self.batch is None or len(x) == self.batch:
            return self._run(x)
        if self.decoder is not None and not self.decoder.graph_is_forward:  # no concatenation
            raise CnnlabError(f"{self.name} detects one image per call")
        parts = [self._run(chunk) for chunk in x.split(self.batch)]
        return [torch.cat(pieces) for pieces in zip(*parts, strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        """The first output for batch ``x``: logits, or a YOLOv1 grid."""
        return self.outputs(x)[0]

    @torch.no_grad()
    def detect(
        self,
        images: Tensor,
        limits: DetectLimits | None = None,
        proposals: list[Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections per image in the input's pixels, labels 0-based, as a detector's
        (``limits``: evaluation's unless given)."""
        if self.decoder is None:
            raise CnnlabError(f"{self.name} is not a detector")
        if limits is None:
            from cnnlab.models.detection.contract import EVAL_LIMITS

            limits = EVAL_LIMITS
        settings = self.metadata.get("detect") or {}
        return self.decoder.decode_graph(self.outputs, images, limits, settings, self.name)


def onnx_model(path: str | Path, threads: int | None = None) -> ExportedModel:
    """An ONNX file in an ONNX Runtime session on the CPU, with ``threads`` intra-op threads
    (default: torch's ``get_num_threads()``, so one setting governs both runtimes)."""
    import onnxruntime as ort

    path = Path(path)
    metadata = read_metadata(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # ONNX Runtime's own log would print its errors as well, over several lines; they
    # reach the user as one CnnlabError line instead.
    options.log_severity_level = 4
    # Idle threads that spin for work steal the cores that torch's preprocessing (and,
    # on a shared machine, everyone else) needs between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise CnnlabError(f"{path}: ONNX Runtime cannot load it ({_first_line(error)})") from None
    _check_graph(session, metadata, path)
    (graph_input,) = session.get_inputs()

    def run(x: Tensor) -> list[Tensor]:
        try:
            found = session.run(None, {graph_input.name: x.numpy()})
        except Exception as error:  # a graph that breaks on inputs of its declared shape
            raise CnnlabError(f"{path}: ONNX Runtime failed ({_first_line(error)})") from None
        return [torch.from_numpy(out) for out in found]

    return ExportedModel(run, metadata, str(path))


def pt2_model(path: str | Path) -> ExportedModel:
    """A ``.pt2`` file (``torch.export.save``) loaded as a torch module."""
    path = Path(path)
    files = {PT2_METADATA: ""}
    try:
        program = torch.export.load(path, extra_files=files)
        metadata = json.loads(files[PT2_METADATA])
    except Exception as error:
        raise CnnlabError(f"{path}: not an exported cnnlab model ({_first_line(error)})") from None
    module = program.module()

    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            out = module(x)
        return list(out) if isinstance(out, tuple | list) else [out]

    return ExportedModel(run, metadata, str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# How each exported format is loaded back (the parity check, the onnxruntime backend).
LOADERS: dict[str, Callable[[str | Path], ExportedModel]] = {"onnx": onnx_model, "pt2": pt2_model}
