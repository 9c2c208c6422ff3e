"""Why each layer's output has its size: the notes' ``(n - f + 2p)/s + 1``, filled in.

``size_formula(module, input_shape, output_shape, merge)`` writes the rule a layer applied
with its own numbers: convolutions and pooling ``(224 - 11 + 2*2)/4 + 1 = 55`` (``floor``
or ``ceil`` written out where the division is not exact), transposed convolutions
``(n - 1)*s - 2p + d*(k - 1) + output_padding + 1``, adaptive pools ``adaptive 13 -> 6``,
flattening and linear layers their sizes, and where branches meet the add or the
concatenation (``concat 64 + 128 + 32 + 32 = 256 channels``). Spatial axes with the same
formula are written once; others one per axis (``H: ...; W: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

UNCHANGED = "unchanged"  # the size formula of a layer that keeps its input's shape
_AXES = ("D", "H", "W")
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def size_formula(
    module: nn.Module,
    input_shape: Sequence[int] | None,
    output_shape: Sequence[int],
    merge: str | None = None,
) -> str:
    """The rule that gives ``output_shape`` (without batch) from ``input_shape``."""
    if merge is not None:
        return merge
    if input_shape is None:
        return ""
    spatial_in, spatial_out = list(input_shape[1:]), list(output_shape[1:])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return _per_axis(spatial_in, spatial_out, _transposed_terms(module, len(spatial_in)))
    if isinstance(module, (nn.modules.conv._ConvNd, *_POOLS)):
        return _per_axis(spatial_in, spatial_out, _window_terms(module, len(spatial_in)))
    if isinstance(module, _ADAPTIVE):
        return f"adaptive {_shape(spatial_in)} -> {_shape(spatial_out)}"
    if isinstance(module, nn.Flatten):
        sizes = list(input_shape)
        return f"{'*'.join(map(str, sizes))} = {math.prod(sizes):,}"
    if isinstance(module, nn.Linear):
        return f"{module.in_features:,} -> {module.out_features:,}"
    if list(input_shape) == list(output_shape):
        return UNCHANGED
    return f"{_shape(input_shape)} -> {_shape(output_shape)}"


def merge_formula(name: str, inputs: Sequence[Sequence[int]], output: Sequence[int]) -> str:
    """How branches met: an add keeps one size; a concatenation on the channels adds
    the branches' channels (``64 + 6x32 = 256`` when many are alike)."""
    if name in ("cat", "concat", "concatenate"):
        channels = [shape[1] for shape in inputs]
        return f"concat {_sum(channels)} = {output[1]:,} channels"
    return f"add {' + '.join(_shape(s[1:]) for s in inputs)} -> {_shape(output[1:])}"


def _sum(values: Sequence[int]) -> str:
    """64 + 32 + 32 + 32 -> "64 + 3x32": runs of one value written once with a count."""
    parts: list[str] = []
    run = [values[0]]
    for value in values[1:]:
        if value == run[-1]:
            run.append(value)
            continue
        parts.append(_run(run))
        run = [value]
    parts.append(_run(run))
    return " + ".join(parts)


def _run(run: list[int]) -> str:
    return f"{len(run)}x{run[0]}" if len(run) > 2 else " + ".join(map(str, run))


def _shape(sizes: Sequence[int]) -> str:
    return "x".join(map(str, sizes))


def _tuple(value: object, rank: int) -> tuple:
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(value)
    return value * rank if len(value) == 1 else value


def _window_terms(module: nn.Module, rank: int) -> list[tuple]:
    """Per axis (span text, span, padding, stride, ceil) of a conv or pooling layer, whose
    output is ``(n - span + 2*p)/s + 1``, span ``d*(k - 1) + 1`` (``k`` undilated)."""
    kernel = _tuple(module.kernel_size, rank)
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, rank)
    dilation = _tuple(getattr(module, "dilation", 1), rank)
    padding = getattr(module, "padding", 0)
    if padding == "same":
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    elif padding == "valid":
        padding = 0
    padding = _tuple(padding, rank)
    ceil = bool(getattr(module, "ceil_mode", False))
    terms = []
    for k, s, d, p in zip(kernel, stride, dilation, padding, strict=True):
        text = str(k) if d == 1 else f"{d}*({k} - 1) - 1"
        terms.append((text, d * (k - 1) + 1, p, s, ceil))
    return terms


def _per_axis(spatial_in: list[int], spatial_out: list[int], terms: list) -> str:
    formulas = []
    for n, out, term in zip(spatial_in, spatial_out, terms, strict=True):
        formulas.append(term(n, out) if callable(term) else _window_text(n, out, *term))
    if len(set(formulas)) == 1:
        return formulas[0]
    names = _AXES[-len(formulas) :]
    return "; ".join(f"{axis}: {text}" for axis, text in zip(names, formulas, strict=True))


def _window_text(n: int, out: int, text: str, span: int, p: int, s: int, ceil: bool) -> str:
    inner = f"{n} - {text} + 2*{p}"
    if s == 1:
        return f"{inner} + 1 = {out}"
    if (n - span + 2 * p) % s == 0:
        return f"({inner})/{s} + 1 = {out}"
    rounding = "ceil" if ceil else "floor"
    return f"{rounding}(({inner})/{s}) + 1 = {out}"


def _transposed_terms(module: nn.Module, rank: int) -> list:
    kernel = _tuple(module.kernel_size, rank)
    stride, padding = _tuple(module.stride, rank), _tuple(module.padding, rank)
    dilation, extra = _tuple(module.dilation, rank), _tuple(module.output_padding, rank)

    def text(k: int, s: int, p: int, d: int, op: int):
        return lambda n, out: f"({n} - 1)*{s} - 2*{p} + {d}*({k} - 1) + {op} + 1 = {out}"

    return [text(*values) for values in zip(kernel, stride, padding, dilation, extra, strict=True)]
