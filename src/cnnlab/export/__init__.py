"""Export a run's model to ONNX or torch.export's ``.pt2``, proven against the run first.

``export_run(RUN)`` loads the run as ``cnnlab predict`` does (``load_run``: BatchNorm
folded into the convolutions), traces it with ``torch.export`` and writes the program
(``torch.export.save``) or its ONNX translation (``torch.onnx.export(..., dynamo=True)``;
the TorchScript exporter only where that fails, as on Faster R-CNN's data-dependent box
filtering, or cannot write the opset asked for). What is exported, per task:

* classification: logits (N, K) for (N, C, S, S) images at the run's size S;
* segmentation: logits (N, K, H, W) at any H, W the model takes (else at S x S);
* detectors: what the model declares (``cnnlab.models.detection.Detector``): YOLOv1's
  raw (N, S, S, B*5 + C) grid, the decoding written into the file; Faster R-CNN's boxes,
  scores and labels of one image under ``EVAL_LIMITS``; a refusal for the others.

Inputs are normalised float32 images (``runtime.METADATA`` carries the mean, std, size and
class names). The file is written under a temporary name, run on ``PARITY_IMAGES`` images
of the run's validation split (random images when it has none) beside the run's own model,
and renamed into place only when the outputs agree (``check_parity``); the figures go to
``export.json`` beside it.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab import checkpoint
from cnnlab.destinations import check_destination, check_targets
from cnnlab.errors import CnnlabError
from cnnlab.export.int8 import CALIBRATION_IMAGES, MAX_DROP_POINTS, quantize_checked
from cnnlab.export.parity import PARITY_IMAGES, check_parity
from cnnlab.export.writers import WRITERS, Traced, trace
from cnnlab.files import (
    atomic_write_bytes,
    discard,
    folder_lock,
    read_json,
    run_lock,
    sha256_of,
    write_json,
)
from cnnlab.models.detection import EVAL_LIMITS
from cnnlab.runs import Run, load_run
from cnnlab.runtime import FILES, LOADERS
from cnnlab.version import __version__

FORMATS = tuple(WRITERS)
RECORD = "export.json"  # beside the exported file: one entry per file name
RECORD_KEYS = {"file", "run", "format", "parity"}  # what every entry of ours has


def export_run(
    run_dir: str | Path,
    format: str | None = None,
    out: str | Path | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    images: int = PARITY_IMAGES,
    overwrite: bool = False,
    int8: bool = False,
    calibration: int = CALIBRATION_IMAGES,
    max_drop: float = MAX_DROP_POINTS,
) -> dict[str, Any]:
    """Export the run folder's model and return its record (also in ``export.json``).

    ``format`` is ``onnx`` or ``pt2`` (default: from ``out``'s suffix, else onnx); ``out``
    defaults to ``RUN/model.onnx`` (``RUN/model.pt2``) and replaces an existing file only
    with ``overwrite``. ``opset`` picks the ONNX opset (default: the exporter's);
    ``dynamic_batch`` lets the batch size vary (otherwise the graph takes one image).
    A model an exporter cannot handle, or an export whose outputs differ from the run's
    on ``images`` images, is a CnnlabError, and no file is left behind.

    ``int8`` writes the float ONNX graph quantised to int8 instead (default
    ``RUN/model.int8.onnx``; ``cnnlab.export.int8``), its activations calibrated on
    ``calibration`` training images, kept only when the run's test metric drops by at most
    ``max_drop`` points; the record's ``int8`` entry has the drop and the speed-up.
    """
    run_dir = checkpoint.require_run_dir(run_dir)
    if int8 and format not in (None, "onnx"):
        raise CnnlabError(f"--int8 writes an ONNX file, not {format}")
    if calibration < 1:
        raise CnnlabError(f"--calibration must be at least 1, got {calibration}")
    format, target = _target(
        run_dir, "onnx" if int8 else format, out, overwrite, "onnx-int8" if int8 else None
    )
    record_file = target.parent / RECORD
    _read_records(record_file)  # a file that is not ours is refused before any work
    # Writing into the run folder takes it as training does: the run cannot change under
    # the export (a resumed training), nor two exports into it run at once (the second
    # is refused, naming the first). A run only read (--out elsewhere) may be read-only.
    into_run = target.parent.resolve().is_relative_to(run_dir.resolve())
    with run_lock(run_dir) if into_run else nullcontext():
        if int8:
            record = _export_int8(
                run_dir, target, opset, dynamic_batch, images, calibration, max_drop
            )
        else:
            record = _export(run_dir, format, target, opset, dynamic_batch, images)
        # Other runs exported into the same folder write the same record: one at a time,
        # each re-reading it, so no entry is lost.
        with folder_lock(record_file.parent):
            records = _read_records(record_file)
            records[target.name] = record
            write_json(record_file, records)
    return record


def _export(
    run_dir: Path,
    format: str,
    target: Path,
    opset: int | None,
    dynamic_batch: bool,
    images: int,
) -> dict[str, Any]:
    """Write ``target`` (after its parity check) and return its record."""
    writer = WRITERS[format]
    run = load_run(run_dir, device="cpu")
    run.model.to(memory_format=torch.contiguous_format)  # exported graphs take plain NCHW
    module, output, names, onnx_exporter = _graph(run, dynamic_batch)
    dynamic = _dynamic_axes(run, dynamic_batch)
    example = _example(run, dynamic)
    started = time.perf_counter()
    program, why_no_program = None, None
    if writer.needs_program or onnx_exporter == "dynamo":  # else torch.export is known to fail
        try:
            min_size = getattr(run.model, "min_input_size", 1)
            program, dynamic = trace(module, example, dynamic, min_size)
        except Exception as error:  # the exporter's own error, whatever it is
            why_no_program = error
    traced = Traced(
        run.meta.architecture,
        module,
        example,
        dynamic,
        names,
        program,
        why_no_program,
        _metadata(run, output, dynamic),
    )
    data, exporter, opset = writer.write(traced, opset)
    seconds = time.perf_counter() - started
    partial = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.partial{target.suffix}")
    try:
        atomic_write_bytes(partial, data)
        exported = LOADERS[format](partial)
        parity = check_parity(run, exported, images)
        if not parity["passed"]:
            raise CnnlabError(f"{target}: parity check failed ({parity['failure']}); not written")
        os.replace(partial, target)
    except OSError as error:  # named by the file asked for, not the temporary one
        raise OSError(error.errno, error.strerror, str(target)) from None
    finally:
        discard(partial)
    record = {
        "file": str(target),
        "run": str(run_dir),
        "format": format,
        "exporter": exporter,
        "opset": opset,
        "input": {"name": names[0], "shape": _input_shape(run, dynamic), "dynamic": dynamic},
        "outputs": names[1:],
        "output": output,
        "bytes": len(data),
        "export_seconds": round(seconds, 2),
        "parity": parity,
        "metadata": traced.metadata,
        "versions": _versions(),
    }
    return record


def _export_int8(
    run_dir: Path,
    target: Path,
    opset: int | None,
    dynamic_batch: bool,
    images: int,
    calibration: int,
    max_drop: float,
) -> dict[str, Any]:
    """Write ``target``, the run's float ONNX graph (exported and checked in a temporary
    folder) quantised to int8, when it holds the run's metric; return its record."""
    with tempfile.TemporaryDirectory(prefix="cnnlab-int8-") as folder:
        float_file, int8_file = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        record = _export(run_dir, "onnx", float_file, opset, dynamic_batch, images)
        run = load_run(run_dir, device="cpu")
        figures = quantize_checked(run, float_file, int8_file, calibration, max_drop, target)
        data = int8_file.read_bytes()
    atomic_write_bytes(target, data)
    parity = {**record["parity"], "of": "the float graph before quantisation"}
    return record | {
        "file": str(target),
        "bytes": len(data),
        "float_bytes": record["bytes"],
        "parity": parity,
        "int8": figures,
    }


def describe(record: dict[str, Any]) -> str:
    """An export record in three lines, as ``cnnlab export`` prints it."""
    parity = record["parity"]
    opset = f", opset {record['opset']}" if record["opset"] else ""
    shape = "(" + ", ".join(str(n) for n in record["input"]["shape"]) + ")"
    lines = [
        f"exported {record['file']}: {record['format']} ({record['exporter']} exporter{opset}),"
        f" input {shape}, {record['bytes'] / 1e6:.1f} MB in {record['export_seconds']:.1f} s",
        f"parity with the run's model on {parity['inputs']}: " + _parity_figures(parity),
    ]
    if "int8" in record:
        int8 = record["int8"]
        lines[0] = lines[0].replace(": onnx (", ": int8 onnx (", 1)
        lines[1] = "float graph's " + lines[1]
        lines.append(
            f"int8 ({int8['calibration']} to calibrate): {int8['split']} {int8['metric']}"
            f" {int8['float']:.2%} -> {int8['int8']:.2%} ({int8['drop_points']:.2f} points"
            f" lost, {int8['max_drop_points']:g} allowed), {int8['speedup']:.2f}x the float"
            f" graph's speed in ONNX Runtime ({int8['float_ms']:.2f} -> {int8['int8_ms']:.2f}"
            f" ms, {int8['timed']})"
        )
    lines.append(f"record: {Path(record['file']).parent / RECORD}")
    return "\n".join(lines)


def _parity_figures(parity: dict[str, Any]) -> str:
    figures = []
    if "max_abs_diff" in parity:
        figures.append(
            f"max |difference| {parity['max_abs_diff']:.2g} (tolerance {parity['tolerance']:.2g})"
        )
    named = (("top1", "top-1"), ("mask_pixels", "mask pixels"), ("labels", "label decisions"))
    for key, what in named:
        if f"{key}_same" in parity:
            same, ties = parity[f"{key}_same"], parity[f"{key}_ties"]
            tied = f" (+{ties} ties within rounding)" if ties else ""
            figures.append(f"{what} the same on {same} of {parity[f'{key}_total']}{tied}")
    if "detections" in parity:
        figures.append(
            f"{parity['matched']} of {parity['detections']} detections matched (IoU >="
            f" {parity['min_iou']:.6g}, scores within {parity['max_score_diff']:.2g})"
        )
    return ", ".join(figures)


def _target(
    run_dir: Path,
    format: str | None,
    out: str | Path | None,
    overwrite: bool,
    file: str | None = None,
) -> tuple[str, Path]:
    """(format, file to write): ``file`` names the default's kind in ``FILES`` when it is
    not the format's own (int8's)."""
    suffixed = {f".{name}": name for name in FORMATS}
    if out is not None and format is None:
        format = suffixed.get(Path(out).suffix, "onnx")
    format = format or "onnx"
    if format not in FORMATS:
        raise CnnlabError(f"unknown export format {format!r}; choose onnx or pt2")
    target = Path(out) if out is not None else run_dir / FILES[file or format]
    if target.suffix != f".{format}":
        raise CnnlabError(f"{target}: a {format} file must end in .{format}")
    check_targets([target], [], overwrite, "--out")
    if not target.parent.is_dir():
        raise CnnlabError(f"{target.parent}: no such folder")
    if not os.access(target.parent, os.W_OK):  # known now, not after a long trace
        raise CnnlabError(f"{target.parent}: not writable (read-only); choose another --out")
    return format, target


def _read_records(path: Path) -> dict:
    """export.json's entries, checked before anything is exported (it is rewritten): a
    file of the same name that is not cnnlab's record (the user's own) is never replaced."""
    check_destination(path, "--out")
    if not path.exists():
        return {}
    records = read_json(path)
    if not isinstance(records, dict) or not all(
        isinstance(entry, dict) and entry.keys() >= RECORD_KEYS for entry in records.values()
    ):
        raise CnnlabError(
            f"{path}: not a cnnlab export record; export into another folder or move it away"
        )
    return records


def _graph(run: Run, dynamic_batch: bool) -> tuple[nn.Module, str, list[str], str]:
    """(module to trace, its output kind, [input name, output names...], the ONNX exporter
    to use): a task's logits, or what a detector declares (``Detector``), its refusal too."""
    if run.task.exported_logits is not None:
        return run.model, "logits", ["images", "logits"], "dynamo"
    detector, name = run.model, run.meta.architecture
    if detector.export_refusal is not None:
        raise CnnlabError(f"{name} {detector.export_refusal}")
    if dynamic_batch and not detector.graph_is_forward:
        raise CnnlabError(
            f"{name} exports the detections of one image per call; drop --dynamic-batch"
        )
    names = ["images", *detector.graph_outputs]
    return detector.graph(EVAL_LIMITS), detector.graph_output, names, detector.onnx_exporter


def _dynamic_axes(run: Run, dynamic_batch: bool) -> list[str]:
    """The input axes to export as dynamic: the batch on request; per-pixel logits' height
    and width unless the model has a fixed input size."""
    axes = ["batch"] if dynamic_batch else []
    if (
        run.task.exported_logits == "pixels"
        and getattr(run.model, "fixed_input_size", None) is None
    ):
        axes += ["height", "width"]
    return axes


def _metadata(run: Run, output: str, dynamic: list[str]) -> dict[str, Any]:
    meta = run.meta
    metadata: dict[str, Any] = {
        "task": meta.task,
        "architecture": meta.architecture,
        "classes": list(meta.classes),
        "input_size": list(meta.input_size),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "output": output,
        "dynamic": dynamic,
        "weights_sha256": sha256_of(run.path / "best.safetensors"),
        "cnnlab_version": __version__,
    }
    if run.task.exported_logits == "labels":  # multi-label: sigmoid scores, a threshold each
        metadata["thresholds"] = list(run.meta.thresholds or [0.5] * len(meta.classes))
    if run.task.exported_logits is None:  # a detector: its decoding, in words and figures
        metadata |= run.model.graph_metadata(EVAL_LIMITS)
    return metadata


def _example(run: Run, dynamic: list[str]) -> Tensor:
    """A random normalised input at the run's size (two images when the batch is dynamic:
    torch.export would take a batch of one for a fixed 1)."""
    channels, height, width = run.meta.input_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2 if "batch" in dynamic else 1, channels, height, width, generator=generator)


def _input_shape(run: Run, dynamic: list[str]) -> list[int | str]:
    shape: list[int | str] = [1, *run.meta.input_size]
    for axis, name in enumerate(("batch", None, "height", "width")):
        if name in dynamic:
            shape[axis] = name
    return shape


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cnnlab": __version__,
    }
