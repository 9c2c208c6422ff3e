"""Running an exported model (``cnnlab export``): its metadata, and an ONNX Runtime session
or a loaded ``.pt2`` program behind the calls a task makes of a model.

``ExportedModel`` is an ``nn.Module`` so that a task's ``predict`` and ``evaluate`` run it
unchanged: ``model(x)`` returns what the exported graph returns for the batch (logits, a
YOLOv1 grid), and a detector's ``model.detect(images, score_threshold, nms_threshold,
max_detections)`` decodes it: a YOLOv1 grid with ``cnnlab.models.yolo.decode``, the model's
own decoding; other detectors export their detections, filtered here by score. A graph
exported for one image per call (no ``--dynamic-batch``) is called once per image.

Every exported file carries ``METADATA`` (ONNX ``metadata_props``, one JSON document per
key; inside a ``.pt2`` the same keys as ``cnnlab.json``), so it is usable without the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError

FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}  # in the run folder, by default
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
    "detect",  # for detectors: the "boxes" per YOLOv1 cell, or the thresholds built in
    "weights_sha256",  # of the run's best.safetensors the file was exported from
    "cnnlab_version",
)
OUTPUTS = {
    "logits": "classification (N, K) or segmentation (N, K, H, W) logits",
    "yolov1_grid": "YOLOv1's raw (N, S, S, B*5 + C) grid",
    "detections": "boxes (M, 4) xyxy in input pixels, scores (M,), labels (M,) 0-based",
}
YOLO_DECODING = (
    "output (N, S, S, B*5 + C): per cell, B boxes (x, y, w, h, confidence) then C class "
    "probabilities; x, y are the box centre inside its cell and w, h its size relative to "
    "the input, all in 0..1. A box's score for class c is confidence * p(c); candidates "
    "above a score threshold go through per-class NMS at IoU 0.5, at most 100 per image "
    "(cnnlab.models.yolo.decode). Boxes are in the input's pixels; scale them back to the "
    "original image by its width/W and height/H."
)


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
    return found


class ExportedModel(nn.Module):
    """An exported graph behind ``model(x)`` and, for detectors, ``model.detect``.

    ``run`` maps one float32 CPU batch (N, C, H, W) to the graph's output tensors; it is
    called with ``batch`` images at a time when the graph was exported for a fixed batch.
    """

    def __init__(self, run: Callable[[Tensor], list[Tensor]], metadata: dict, name: str) -> None:
        super().__init__()
        self._run, self.metadata, self.name = run, metadata, name
        dynamic = metadata.get("dynamic", [])
        self.batch = None if "batch" in dynamic else 1
        self.size = None if "height" in dynamic else tuple(metadata["input_size"][1:])

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
        if self.metadata["output"] == "detections":  # per image; no concatenation
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
        score_threshold: float = 0.001,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
    ) -> list[dict[str, Tensor]]:
        """Detections per image in the input's pixels, labels 0-based, as a detector's."""
        settings = self.metadata.get("detect") or {}
        if self.metadata["output"] == "yolov1_grid":
            from cnnlab.models.yolo import decode

            grid = self(images)
            size = tuple(images.shape[-2:])
            return decode(
                grid, settings["boxes"], size, score_threshold, nms_threshold, max_detections
            )
        if self.metadata["output"] != "detections":
            raise CnnlabError(f"{self.name} is not a detector")
        # Built in at export: NMS, its threshold and a low score threshold; a higher one
        # and a smaller cap filter the sorted detections without changing the others (a box
        # under the threshold only ever suppresses boxes scoring lower still).
        if nms_threshold != settings["nms_threshold"]:
            raise CnnlabError(
                f"{self.name} has NMS at IoU {settings['nms_threshold']} built in, not"
                f" {nms_threshold}"
            )
        if score_threshold < settings["score_threshold"]:
            raise CnnlabError(
                f"{self.name} keeps scores of {settings['score_threshold']} and above only"
            )
        found = []
        for image in images:
            boxes, scores, labels = self.outputs(image[None])
            keep = (scores >= score_threshold).nonzero().flatten()[:max_detections]
            found.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return found


def onnx_model(path: str | Path, threads: int | None = None) -> ExportedModel:
    """An ONNX file in an ONNX Runtime session on the CPU, with ``threads`` intra-op threads
    (default: torch's ``get_num_threads()``, so one setting governs both runtimes)."""
    import onnxruntime as ort

    path = Path(path)
    metadata = read_metadata(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle threads that spin for work steal the cores that torch's preprocessing (and,
    # on a shared machine, everyone else) needs between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise CnnlabError(f"{path}: ONNX Runtime cannot load it ({_first_line(error)})") from None
    (graph_input,) = session.get_inputs()

    def run(x: Tensor) -> list[Tensor]:
        return [torch.from_numpy(out) for out in session.run(None, {graph_input.name: x.numpy()})]

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
