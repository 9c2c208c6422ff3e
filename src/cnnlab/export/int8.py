"""int8 ONNX models: ONNX Runtime's static quantisation of a run's float export, kept only
when the run's own test metric holds.

``cnnlab export RUN --int8`` (``export_run(RUN, int8=True)``) exports the run's float ONNX
graph into a temporary folder (with its parity check), and ``quantize_checked`` quantises it
with ``onnxruntime.quantization.quantize_static`` (QDQ format: QuantizeLinear and
DequantizeLinear pairs that ONNX Runtime fuses into integer convolutions; int8 weights per
output channel; uint8 activations whose ranges are the MinMax of ``CALIBRATION_IMAGES``
images of the run's own training split), evaluates both files on the run's evaluation split
through ``Run.evaluate`` (what ``cnnlab eval`` prints) and times both at batch 1,
interleaved. The int8 file is written (``RUN/model.int8.onnx``, loaded by ``--backend
onnxruntime-int8``) only when the metric drops by at most ``MAX_DROP_POINTS`` points;
otherwise a CnnlabError and nothing is left. Why ONNX Runtime and not PyTorch's PT2E
quantisation: docs/export.md (benchmarks/int8.py measures both).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnnlab.errors import CnnlabError
from cnnlab.export.parity import parity_inputs
from cnnlab.export.timing import headline_metric, interleaved_calls
from cnnlab.export.writers import quiet
from cnnlab.runs import Run
from cnnlab.runtime import ExportedModel, onnx_model

CALIBRATION_IMAGES = 64
MAX_DROP_POINTS = 0.5  # of the run's metric (top-1, mIoU, mAP@0.5), in hundredths
TIMED_ROUNDS = 30  # batch-1 calls of each model for the speed-up (fewer past TIMED_SECONDS)
TIMED_SECONDS = 10.0
QUANTIZER = (
    "onnxruntime quantize_static: QDQ, int8 weights per output channel, uint8 activations"
    " calibrated by MinMax"
)


def calibration_inputs(run: Run, count: int) -> tuple[list[Tensor], str]:
    """Up to ``count`` preprocessed images of the run's training split, and where they came
    from; a CnnlabError when the run has none to give (ranges from random images would
    quantise the wrong distribution)."""
    inputs, source = parity_inputs(run, count, split="train")
    if source.startswith("random"):
        reason = source.removeprefix("random images ").strip("()")
        raise CnnlabError(f"{run.path}: int8 needs training images to calibrate on: {reason}")
    return inputs, source


def quantize_onnx(float_file: Path, out_file: Path, inputs: list[Tensor]) -> None:
    """Write ``float_file`` quantised to ``out_file`` (see the module docstring), its
    activation ranges calibrated on ``inputs`` (C, H, W) fed one at a time; the float
    file's cnnlab metadata is carried over."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load(str(float_file), load_external_data=False).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{name: x[None].numpy()} for x in inputs])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with quiet():  # it logs a suggestion to preprocess, and each calibration step
        quantize_static(
            str(float_file),
            str(out_file),
            Images(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    source, quantised = onnx.load(str(float_file)), onnx.load(str(out_file))
    if not quantised.metadata_props:
        for prop in source.metadata_props:
            quantised.metadata_props.add(key=prop.key, value=prop.value)
        onnx.save(quantised, str(out_file))


def quantize_checked(
    run: Run,
    float_file: Path,
    int8_file: Path,
    calibration: int = CALIBRATION_IMAGES,
    max_drop: float = MAX_DROP_POINTS,
    target: Path | None = None,
) -> dict[str, Any]:
    """Quantise ``float_file`` (the run's float export) into ``int8_file`` and return the
    figures for export.json: quantiser, calibration, metric before and after, drop, speed-up.
    A CnnlabError naming ``target`` when the metric drops by more than ``max_drop`` points
    (``int8_file`` is then the caller's to remove)."""
    images, source = calibration_inputs(run, calibration)
    quantize_onnx(float_file, int8_file, images)
    float_model, int8_model = onnx_model(float_file), onnx_model(int8_file)
    figures = compare(run, float_model, int8_model, max_drop)
    if not figures["drop_points"] <= max_drop:  # (also refuses a NaN metric)
        raise CnnlabError(
            f"{target or int8_file}: int8 loses {figures['drop_points']:.2f} points of"
            f" {figures['metric']} ({figures['float']:.2%} -> {figures['int8']:.2%}), more than"
            f" the {max_drop:g} allowed (--max-drop); not written"
        )
    return {"quantizer": QUANTIZER, "calibration": source, **figures} | speedup(
        float_model, int8_model, images[0]
    )


def compare(run: Run, float_model: ExportedModel, int8_model: ExportedModel, max_drop: float):
    """The run's metric on its evaluation split with each model, and the drop in points."""
    reports = [
        dataclasses.replace(run, model=model).evaluate() for model in (float_model, int8_model)
    ]
    (metric, before), (_, after) = (headline_metric(report) for report in reports)
    return {
        "metric": metric,
        "split": reports[0]["split"],
        "float": before,
        "int8": after,
        "drop_points": round((before - after) * 100, 4),
        "max_drop_points": max_drop,
    }


def speedup(float_model: ExportedModel, int8_model: ExportedModel, image: Tensor) -> dict:
    """Median ms of one image through each model (interleaved) and the int8 speed-up."""
    batch = image[None]
    with torch.inference_mode():
        times = interleaved_calls(
            {"float": lambda: float_model(batch), "int8": lambda: int8_model(batch)},
            TIMED_ROUNDS,
            budget_s=TIMED_SECONDS,
        )
    float_ms, int8_ms = (sorted(times[k])[len(times[k]) // 2] * 1e3 for k in ("float", "int8"))
    return {
        "float_ms": round(float_ms, 3),
        "int8_ms": round(int8_ms, 3),
        "speedup": round(float_ms / int8_ms, 3),
        "timed": f"batch 1, {torch.get_num_threads()} thread(s), median of {len(times['float'])}",
        "cpu_flags": _vector_flags(),
    }


def _vector_flags() -> list[str]:
    """The CPU's vector extensions that int8 speed depends on (AVX2; AVX-512 VNNI, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return sorted(f for f in set(flags) if f.startswith(("avx2", "avx512", "avx_vnni", "amx")))
