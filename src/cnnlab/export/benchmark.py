"""``cnnlab benchmark RUN``: which format runs this run's model fastest on this machine, and
at what accuracy.

Each format is a way to run the run's model on the CPU:

* ``torch``: what ``cnnlab predict`` runs (``load_run``: BatchNorm folded, channels_last
  where the task trains so, on the CPU convolutions fused and packed: ``Run.predictor``),
  eager; the other rows' ratios are to it;
* ``compile``: the same module through ``torch.compile`` (inductor,
  ``cnnlab.compiling.compile_model``; the build time is its compile time);
* ``onnx``: ``RUN/model.onnx`` in ONNX Runtime (``--backend onnxruntime``);
* ``onnx-int8``: ``RUN/model.int8.onnx`` (``export --int8``, ``--backend onnxruntime-int8``);
* ``pt2``: ``RUN/model.pt2`` (torch.export's program, loaded back).

A file the run folder lacks (or that holds other weights than the run's) is built in a
temporary folder, with dynamic batch so every batch size runs in one call, and dropped
after; ``save`` writes it into the run folder instead (``export_run``, with its checks:
an int8 model that loses more than ``int8.MAX_DROP_POINTS`` is then refused, and its row
says so). Per format the table has the file's size, the run's metric on its evaluation
split computed through ``Run.evaluate`` with that model (the figure ``cnnlab eval`` prints
with that backend), the latency per image (p50, p90) and images/s at each batch size, from
calls interleaved across formats so that every format sees the same machine load, the
time to build it, and its speed against the torch row. A format that cannot be built for
this model (pt2 of Faster R-CNN) keeps its row, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab import checkpoint
from cnnlab.compiling import compile_model
from cnnlab.errors import CnnlabError
from cnnlab.export.int8 import CALIBRATION_IMAGES, calibration_inputs, quantize_onnx
from cnnlab.export.parity import parity_inputs
from cnnlab.export.timing import headline_metric, interleaved_calls, percentile
from cnnlab.files import sha256_of
from cnnlab.runs import Run, load_run
from cnnlab.runtime import FILES, LOADERS, read_metadata

FORMATS = ("torch", "compile", "onnx", "onnx-int8", "pt2")
REFERENCE = "torch"  # always measured: every ratio is to it
BATCHES = (1, 16)
TIMED_IMAGES = 64  # per format and batch size (at least MIN_CALLS calls)
MIN_CALLS = 5


@dataclasses.dataclass
class Contender:
    """One format's row while it is measured."""

    format: str
    model: nn.Module | None = None
    file: str | None = None
    bytes: int | None = None
    build_seconds: float | None = None
    built: str = "existing"  # "existing", "built" (temporary), "saved" (into the run)
    error: str | None = None


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """The formats asked for (comma-separated), torch first; a CnnlabError for any other."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise CnnlabError(
            f"--formats {unknown[0] if unknown else text!r}: choose from {', '.join(FORMATS)}"
        )
    return [REFERENCE, *dict.fromkeys(n for n in names if n != REFERENCE)]


def parse_batches(text: str | Sequence[int]) -> list[int]:
    """Batch sizes (comma-separated), each a whole number >= 1."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        batches = [int(p) for p in parts]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise CnnlabError(f"--batch {text!r}: expected batch sizes >= 1, such as 1,16")
    return list(dict.fromkeys(batches))


def benchmark_run(
    run_dir: str | Path,
    formats: str | Sequence[str] = FORMATS,
    batches: str | Sequence[int] = BATCHES,
    threads: int | None = None,
    images: int = TIMED_IMAGES,
    save: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the run's model in each of ``formats`` (see the module docstring) with
    ``threads`` threads (default: torch's), ``images`` images per format and batch size, and
    return the table as a dict (``rows``, one per format). ``say`` gets a line per step."""
    run_dir = checkpoint.require_run_dir(run_dir)
    names, sizes = parse_formats(formats), parse_batches(batches)
    if images < 1:
        raise CnnlabError(f"--images must be at least 1, got {images}")
    if threads is not None and threads < 1:
        raise CnnlabError(f"--threads must be at least 1, got {threads}")
    say = say or (lambda line: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with tempfile.TemporaryDirectory(prefix="cnnlab-benchmark-") as folder:
            run = load_run(run_dir, device="cpu")
            inputs, source = parity_inputs(run, max(sizes), split=run.task.eval_split)
            build = _Builder(run, Path(folder), save, say)
            contenders = [build(name, torch.stack(inputs[:1])) for name in names]
            rows = [_evaluate(run, c, say) for c in contenders]
            timed = [c.format for c in contenders if c.model is not None]
            say(f"timing {', '.join(timed)} interleaved")
            _time(run, contenders, rows, _batches(inputs, sizes), images)
    finally:
        torch.set_num_threads(previous)
    return {
        "run": str(run_dir),
        "threads": threads or previous,
        "batches": sizes,
        "timed_images": images,
        "inputs": source,
        "rows": rows,
    }


class _Builder:
    """Each format's model: the run folder's file when it is the run's present model, else
    built (in ``folder``, or with ``save`` in the run folder)."""

    def __init__(self, run: Run, folder: Path, save: bool, say: Callable[[str], None]) -> None:
        self.run, self.folder, self.save, self.say = run, folder, save, say
        self.weights = sha256_of(run.path / "best.safetensors")

    def __call__(self, name: str, example: Tensor) -> Contender:
        contender = Contender(name)
        try:
            if name in ("torch", "compile"):
                self._torch(contender, example)
            else:
                self._file(contender)
        except CnnlabError as error:
            contender.error, contender.model = str(error), None
        return contender

    def _torch(self, contender: Contender, example: Tensor) -> None:
        weights = self.run.path / "best.safetensors"
        contender.file, contender.bytes = str(weights), weights.stat().st_size
        contender.model = self.run.predictor  # the fused model, as predict and eval run it
        if contender.format == "compile":
            self.say("compiling the model (torch.compile, inductor)")
            compiled = compile_model(self.run.model, _as_predicted(self.run, example, "torch"))
            contender.build_seconds, contender.built = compiled.seconds, "built"
            if not compiled.compiled:
                raise CnnlabError(f"torch.compile failed, {compiled.reason}")
            contender.model = compiled.model

    def _file(self, contender: Contender) -> None:
        kind = contender.format
        path = self.run.path / FILES[kind]
        if not self._current(path):
            started = time.perf_counter()
            path = self._saved(kind, path) if self.save else self._temporary(kind)
            contender.build_seconds = time.perf_counter() - started
            contender.built = "saved" if self.save else "built"
        contender.model = LOADERS["onnx" if kind == "onnx-int8" else kind](path)
        contender.file, contender.bytes = str(path), path.stat().st_size

    def _current(self, path: Path) -> bool:
        """Whether ``path`` is an export of the run's present weights."""
        if not path.is_file():
            return False
        try:
            return read_metadata(path).get("weights_sha256") == self.weights
        except CnnlabError:
            return False

    def _saved(self, kind: str, path: Path) -> Path:
        """``path`` in the run folder, through ``export_run``'s checks (a stale file, of
        other weights, replaced)."""
        from cnnlab.export import export_run

        self.say(f"exporting {path.name} into the run folder")
        format, int8 = ("onnx", True) if kind == "onnx-int8" else (kind, False)
        export_run(
            self.run.path, format, path, dynamic_batch=True, overwrite=path.exists(), int8=int8
        )
        return path

    def _temporary(self, kind: str) -> Path:
        """The format's file built in the temporary folder (int8: the float ONNX graph,
        quantised as ``export --int8`` does, without its refusal: the row shows the loss)."""
        from cnnlab.export import export_run

        target = self.folder / FILES[kind]
        if target.is_file():
            return target
        if kind != "onnx-int8":
            self.say(f"exporting {target.name} into a temporary folder")
            export_run(self.run.path, kind, target, dynamic_batch=True)
            return target
        own = self.run.path / FILES["onnx"]
        dynamic = self._current(own) and "batch" in read_metadata(own).get("dynamic", [])
        float_file = own if dynamic else self._temporary("onnx")
        self.say("quantising to int8 (onnxruntime quantize_static)")
        inputs, _ = calibration_inputs(self.run, CALIBRATION_IMAGES)
        quantize_onnx(float_file, target, inputs)
        return target


def _as_predicted(run: Run, batch: Tensor, format: str) -> Tensor:
    """The batch as ``Run.predict`` hands it to the model: channels_last for torch modules
    of a task that runs so (an exported model makes its own layout)."""
    if format in ("torch", "compile") and run.task.channels_last:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _evaluate(run: Run, contender: Contender, say: Callable[[str], None]) -> dict[str, Any]:
    """The row of ``contender`` with the run's metric computed with its model."""
    row: dict[str, Any] = {
        "format": contender.format,
        "file": contender.file,
        "bytes": contender.bytes,
        "source": contender.built,
        "build_seconds": None
        if contender.build_seconds is None
        else round(contender.build_seconds, 2),
    }
    if contender.model is not None:
        say(f"evaluating {contender.format}")
        try:
            report = dataclasses.replace(run, model=contender.model).evaluate()
            row["metric"], row["value"] = headline_metric(report)
            row["split"] = report["split"]
        except CnnlabError as error:
            contender.error, contender.model = str(error), None
    row["error"] = contender.error
    return row


def _batches(inputs: list[Tensor], sizes: list[int]) -> dict[int, Tensor]:
    """One batch of each size from ``inputs``, repeated when there are fewer images."""
    return {size: torch.stack([inputs[i % len(inputs)] for i in range(size)]) for size in sizes}


@torch.inference_mode()
def _time(
    run: Run,
    contenders: list[Contender],
    rows: list[dict[str, Any]],
    batches: dict[int, Tensor],
    images: int,
) -> None:
    """Latency and throughput of every working contender at each batch size, interleaved,
    into ``rows``."""
    working = [(c, row) for c, row in zip(contenders, rows, strict=True) if c.model is not None]
    # A detector is timed to its boxes, as predict runs it (an exported one decodes its
    # graph's outputs in ``detect`` too); the others to their logits.
    method = "detect" if run.meta.task == "detect" else "__call__"
    for size, batch in batches.items():
        laid = {c.format: _as_predicted(run, batch, c.format) for c, _ in working}
        calls = {c.format: partial(getattr(c.model, method), laid[c.format]) for c, _ in working}
        times = interleaved_calls(calls, max(MIN_CALLS, math.ceil(images / size)))
        reference = percentile(times[REFERENCE], 0.5) if REFERENCE in times else None
        for contender, row in working:
            seconds = times[contender.format]
            median = percentile(seconds, 0.5)
            row.setdefault("batches", {})[str(size)] = {
                "p50_ms": round(median / size * 1e3, 4),
                "p90_ms": round(percentile(seconds, 0.9) / size * 1e3, 4),
                "images_per_s": round(size / median, 2),
                "speedup": None if reference is None else round(reference / median, 3),
                "calls": len(seconds),
            }


def describe(table: dict[str, Any]) -> str:
    """The table as ``cnnlab benchmark`` prints it: one line per format, the errors under."""
    sizes = table["batches"]
    header = ["format", "MB", "metric", "build s"]
    for size in sizes:
        header += [f"b{size} p50 ms", f"b{size} p90 ms", f"b{size} img/s", f"b{size} x torch"]
    lines = [header]
    notes = []
    for row in table["rows"]:
        metric = f"{row['metric']} {row['value']:.2%}" if row.get("metric") else "-"
        size_mb = f"{row['bytes'] / 1e6:.2f}" if row["bytes"] else "-"
        build = f"{row['build_seconds']:.1f}" if row["build_seconds"] is not None else "-"
        cells = [row["format"], size_mb, metric, build]
        for size in sizes:
            timed = (row.get("batches") or {}).get(str(size))
            if timed is None:
                cells += ["-"] * 4
                continue
            ratio = "-" if timed["speedup"] is None else f"{timed['speedup']:.2f}x"
            cells += [
                f"{timed['p50_ms']:.3f}",
                f"{timed['p90_ms']:.3f}",
                f"{timed['images_per_s']:.1f}",
                ratio,
            ]
        lines.append(cells)
        if row["error"]:
            notes.append(f"{row['format']}: {row['error']}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    split = next((row["split"] for row in table["rows"] if row.get("split")), None)
    title = (
        f"{table['run']}: {table['threads']} thread(s), {table['timed_images']} images per"
        f" format and batch size, interleaved; metric on the {split} split"
    )
    return "\n".join([title, *text, *notes])
