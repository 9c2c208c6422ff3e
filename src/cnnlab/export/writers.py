"""Tracing a module with torch.export and writing it as ``.pt2`` or ONNX bytes.

ONNX goes through the dynamo exporter (``torch.onnx.export`` of torch.export's program);
only when that fails does the TorchScript-based exporter try. The exporters' progress,
graph dumps, optimizer logs and deprecation warnings are kept off the terminal.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.runtime import PT2_METADATA

AXES = {"batch": 0, "height": 2, "width": 3}  # input (N, C, H, W) axes that may be dynamic
TORCHSCRIPT_OPSET = 17  # the TorchScript exporter's default is older than some ops need


def trace(
    module: nn.Module, example: Tensor, dynamic: list[str], min_size: int = 1
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export's program of ``module`` on ``example`` with the ``dynamic`` axes (of
    ``AXES``; height and width from ``min_size`` up), and the axes it got: where height and
    width cannot be dynamic it is traced at the example's size. Raises what torch.export
    raises."""
    with quiet():  # a failing torch.export prints its whole graph on stderr
        try:
            return _export(module, example, dynamic, min_size), dynamic
        except Exception:
            if "height" not in dynamic:
                raise
        fixed = [axis for axis in dynamic if axis == "batch"]
        return _export(module, example, fixed, min_size), fixed


def _export(
    module: nn.Module, example: Tensor, dynamic: list[str], min_size: int
) -> torch.export.ExportedProgram:
    if not dynamic:
        return torch.export.export(module, (example,))
    axes = {
        AXES[name]: torch.export.Dim(name, min=1 if name == "batch" else min_size)
        for name in dynamic
    }
    # Size-oblivious reasoning: otherwise torch.export fixes any size that is 1 in the
    # example, or in an intermediate map (FCN's stride-32 scores of a 32-pixel input), to 1.
    import torch.fx.experimental._config as symbolic

    with symbolic.patch(backed_size_oblivious=True):
        return torch.export.export(module, (example,), dynamic_shapes=(axes,))


def pt2_bytes(program: torch.export.ExportedProgram, metadata: dict[str, Any]) -> bytes:
    """``torch.export.save`` of the program, ``metadata`` inside as ``PT2_METADATA``."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={PT2_METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def onnx_proto(
    program: torch.export.ExportedProgram | None,
    module: nn.Module,
    example: Tensor,
    dynamic: list[str],
    names: list[str],
    opset: int | None,
    why_no_program: BaseException | None = None,
) -> tuple[Any, str]:
    """(ONNX ModelProto, exporter): the dynamo exporter's translation of ``program``, or,
    when there is none (torch.export failed with ``why_no_program``, or was not tried) or it
    fails, the TorchScript exporter's trace of ``module``. ``names``: the input's, then the
    outputs'. A CnnlabError giving both exporters' reasons when neither can."""
    import onnx

    reason = why_no_program
    if program is not None:
        try:
            with quiet():
                exported = torch.onnx.export(
                    program,
                    (example,),
                    dynamo=True,
                    external_data=False,
                    opset_version=opset,
                    input_names=names[:1],
                    output_names=names[1:],
                )
            written = opset_of(exported.model_proto)
            if opset is None or written == opset:
                return exported.model_proto, "dynamo"
            # It cannot convert every graph down, and then writes its own opset instead.
            reason = CnnlabError(f"it wrote opset {written}, not {opset}")
        except Exception as error:
            reason = error
    dynamic_axes = {names[0]: {AXES[name]: name for name in dynamic}} if dynamic else None
    buffer = io.BytesIO()
    try:
        with quiet():
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset or TORCHSCRIPT_OPSET,
                input_names=names[:1],
                output_names=names[1:],
                dynamic_axes=dynamic_axes,
            )
    except Exception as error:
        if reason is None:  # the model declares the TorchScript exporter: only it was tried
            raise CnnlabError(f"the TorchScript exporter fails ({failure(error)})") from None
        raise CnnlabError(
            f"the dynamo exporter fails ({failure(reason)}) and so does the TorchScript"
            f" exporter ({failure(error)})"
        ) from None
    return onnx.load_from_string(buffer.getvalue()), "torchscript"


def onnx_bytes(proto: Any, metadata: dict[str, Any]) -> tuple[bytes, int]:
    """The file's bytes with ``metadata`` as metadata_props (each value a JSON document),
    and its ai.onnx opset."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString(), opset_of(proto)


def opset_of(proto: Any) -> int:
    """The ai.onnx opset a ModelProto uses."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Nothing from the exporters on stdout, stderr, warnings or logging (onnxscript's
    optimizer logs each pass): the command's own output is all its user should see."""
    sink = io.StringIO()
    with (
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        warnings.catch_warnings(),
        _null_descriptors(),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _null_descriptors() -> Iterator[None]:
    """File descriptors 1 and 2 on /dev/null: the TorchScript exporter prints its graph
    from C++ when it fails, past Python's sys.stdout and sys.stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)


def failure(error: BaseException | None) -> str:
    """An exporter's error in one line: its first line and, when torch names it, the line
    of code that caused it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else type(error).__name__)[:240]
    cause = next((line for line in lines if line.startswith("Caused by: (")), None)
    if cause:
        text = f"{text} {cause.removeprefix('Caused by: ')}"
    if "data-dependent" in text:
        text = f"a tensor size depends on the data: {text}"
    return text


# ---------------------------------------------------------------------------- the formats


@dataclass
class Traced:
    """A run's model as every writer takes it."""

    name: str  # the architecture, for messages
    module: nn.Module  # what the graph computes
    example: Tensor  # an input of the graph's shape
    dynamic: list[str]  # the input axes (of ``AXES``) left free
    names: list[str]  # the graph's input, then its outputs
    program: torch.export.ExportedProgram | None  # torch.export's, when it was made
    why_no_program: BaseException | None  # why there is none, when it was tried
    metadata: dict[str, Any]  # stored in the file (classes, input, normalisation, ...)


@dataclass(frozen=True)
class Writer:
    """One export format: ``write(traced, opset) -> (bytes, exporter, opset)``."""

    write: Callable[[Traced, int | None], tuple[bytes, str, int | None]]
    needs_program: bool  # torch.export's program is the file (else tried where it helps)


def write_pt2(traced: Traced, opset: int | None) -> tuple[bytes, str, int | None]:
    if opset is not None:
        raise CnnlabError("--opset is for ONNX files; a .pt2 has no opset")
    if traced.program is None:
        raise CnnlabError(
            f"{traced.name} cannot be exported to pt2: torch.export fails"
            f" ({failure(traced.why_no_program)}); try --to onnx, whose TorchScript"
            " fallback traces what torch.export cannot"
        )
    return pt2_bytes(traced.program, traced.metadata), "torch.export", None


def write_onnx(traced: Traced, opset: int | None) -> tuple[bytes, str, int | None]:
    try:
        proto, exporter = onnx_proto(
            traced.program,
            traced.module,
            traced.example,
            traced.dynamic,
            traced.names,
            opset,
            traced.why_no_program,
        )
    except CnnlabError as error:
        raise CnnlabError(f"{traced.name} cannot be exported to ONNX: {error}") from None
    data, opset = onnx_bytes(proto, traced.metadata)
    return data, exporter, opset


# Each format cnnlab exports, by the name `cnnlab export --format` takes; its default file
# name and its loader are cnnlab.runtime's FILES and LOADERS.
WRITERS = {"onnx": Writer(write_onnx, needs_program=False), "pt2": Writer(write_pt2, True)}
