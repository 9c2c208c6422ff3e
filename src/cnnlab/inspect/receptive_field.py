"""Receptive field and jump of every tensor of a forward pass, through any architecture:
how each torch function changes a field (the rules ``tracker.FieldTracker`` applies as the
forward pass runs), and which field a model reports (``feature_field``).

A field says, for each spatial axis and each output position ``o``, the first and last
input pixel that ``o`` sees. After convolutions and pooling that is ``jump * o + offset``
for every position alike; after a transposed convolution of stride ``s`` only every s-th
position of the upsampled grid lies on an input, so the field depends on ``o`` modulo the
total upsampling: ``Axis`` keeps one (first, last) pair per position in a period and a
slope per period, and every rule below is exact for that form. Where branches meet (ResNet's
add, Inception's and DenseNet's concatenation) each position takes the union of the
branches' fields. Resampling by a whole factor is exact too; other rescalings keep the
field's sizes and scale its jump.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from cnnlab.inspect.macs import arg

_HOLE = (math.inf, -math.inf)  # a position no input reaches (a transposed conv with k < s)


@dataclass(frozen=True)
class Axis:
    """The field along one axis: output position ``o = q * period + r`` sees input pixels
    ``slope * q + first[r]`` to ``slope * q + last[r]``."""

    period: int
    slope: float
    first: tuple[float, ...]
    last: tuple[float, ...]

    @classmethod
    def pixels(cls) -> Axis:
        """The input itself: position o sees pixel o."""
        return cls(1, 1.0, (0.0,), (0.0,))

    def span(self, o: int) -> tuple[float, float]:
        q, r = divmod(o, self.period)
        return self.slope * q + self.first[r], self.slope * q + self.last[r]

    def sizes(self) -> list[float]:
        """The field's width at each position of a period (positions no input reaches
        left out)."""
        return [b - a + 1 for a, b in zip(self.first, self.last, strict=True) if a <= b]

    @property
    def jump(self) -> float:
        """Input pixels between neighbouring outputs, on average."""
        return self.slope / self.period


def _build(period: int, slope: float, spans: Sequence[tuple[float, float]]) -> Axis:
    return Axis(period, slope, tuple(a for a, _ in spans), tuple(b for _, b in spans))


def _union(spans: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return (
        min((a for a, _ in spans), default=_HOLE[0]),
        max((b for _, b in spans), default=_HOLE[1]),
    )


def window(axis: Axis, kernel: int, stride: int, dilation: int, padding: int) -> Axis:
    """Convolution or pooling: output o sees inputs o*s - p + d*t for t in 0..k-1."""
    period = axis.period // math.gcd(axis.period, stride)
    spans = [
        _union([axis.span(o * stride - padding + dilation * t) for t in range(kernel)])
        for o in range(period)
    ]
    return _build(period, axis.slope * period * stride / axis.period, spans)


def transposed(axis: Axis, kernel: int, stride: int, dilation: int, padding: int) -> Axis:
    """Transposed convolution: output o receives input i when o = i*s - p + d*t for some t
    in 0..k-1; the pattern repeats every s * (the input's period) outputs."""
    period = stride * axis.period
    spans = []
    for o in range(period):
        sources = [
            (o + padding - dilation * t) // stride
            for t in range(kernel)
            if (o + padding - dilation * t) % stride == 0
        ]
        spans.append(_union([axis.span(i) for i in sources]))
    return _build(period, axis.slope, spans)


def merged(axes: Sequence[Axis]) -> Axis:
    """Where branches meet, each position sees what any branch sees."""
    period = math.lcm(*(a.period for a in axes))
    spans = [_union([a.span(o) for a in axes]) for o in range(period)]
    return _build(period, axes[0].slope * period / axes[0].period, spans)


def whole(axis: Axis, size: int) -> Axis:
    """An axis reduced to one value (a global pool, a mean): it sees the whole input."""
    first, last = axis.span(0)[0], axis.span(size - 1)[1]
    return _build(1, axis.slope * size / axis.period, [(first, last)])


def rescaled(axis: Axis, size_in: int, size_out: int) -> Axis:
    """A resampling by no whole factor: the field keeps its sizes, the jump scales."""
    factor = size_in / size_out
    return Axis(axis.period, axis.slope * factor, axis.first, axis.last)


@dataclass(frozen=True)
class Field:
    """One ``Axis`` per spatial dimension."""

    axes: tuple[Axis, ...]

    def widest(self) -> tuple[float, float, float]:
        """(largest field, smallest field, jump) of the axis whose field is largest."""
        sizes = [axis.sizes() or [0.0] for axis in self.axes]
        best = max(range(len(sizes)), key=lambda i: max(sizes[i]))
        return max(sizes[best]), min(sizes[best]), self.axes[best].jump


def ntuple(value: Any, rank: int) -> tuple:
    if isinstance(value, int | float):
        return (value,) * rank
    value = tuple(value)
    return value * rank if len(value) == 1 else value


# A window rule maps (field of the input, input, output, args, kwargs) to the output field.
WindowRule = Callable[[Field, Tensor, Tensor, tuple, dict], Field]


def _padding(value: Any, kernel: Sequence[int], dilation: Sequence[int], rank: int) -> tuple:
    if value == "valid":
        return (0,) * rank
    if value == "same":  # PyTorch pads the left by half the total, rounded down
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    return ntuple(value, rank)


def _conv_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    rank = len(f.axes)
    kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
    stride = ntuple(arg(args, kwargs, 3, "stride", 1), rank)
    dilation = ntuple(arg(args, kwargs, 5, "dilation", 1), rank)
    padding = _padding(arg(args, kwargs, 4, "padding", 0), kernel, dilation, rank)
    return Field(tuple(map(window, f.axes, kernel, stride, dilation, padding)))


def _conv_transpose_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    rank = len(f.axes)
    kernel = tuple(arg(args, kwargs, 1, "weight").shape[2:])
    stride = ntuple(arg(args, kwargs, 3, "stride", 1), rank)
    padding = ntuple(arg(args, kwargs, 4, "padding", 0), rank)
    dilation = ntuple(arg(args, kwargs, 7, "dilation", 1), rank)
    return Field(tuple(map(transposed, f.axes, kernel, stride, dilation, padding)))


def _pool_rule(kernel_at: int, dilation_at: int | None) -> WindowRule:
    def rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
        rank = len(f.axes)
        kernel = ntuple(arg(args, kwargs, kernel_at, "kernel_size"), rank)
        stride = arg(args, kwargs, kernel_at + 1, "stride") or kernel  # None or [] -> kernel
        padding = ntuple(arg(args, kwargs, kernel_at + 2, "padding", 0), rank)
        dilation = 1 if dilation_at is None else arg(args, kwargs, dilation_at, "dilation", 1)
        return Field(
            tuple(
                map(window, f.axes, kernel, ntuple(stride, rank), ntuple(dilation, rank), padding)
            )
        )

    return rule


def _adaptive_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    # Output i pools input[floor(i*n/m) : ceil((i+1)*n/m)]: a window when m divides n,
    # else one span per output, repeating (as if) every m outputs.
    rank = len(f.axes)
    axes = []
    for axis, n, m in zip(f.axes, x.shape[-rank:], y.shape[-rank:], strict=True):
        if m == 1:
            axes.append(whole(axis, n))
        elif n % m == 0:
            axes.append(window(axis, n // m, n // m, 1, 0))
        else:
            spans = [
                _union([axis.span(j) for j in range(i * n // m, math.ceil((i + 1) * n / m))])
                for i in range(m)
            ]
            axes.append(_build(m, axis.span(n)[0] - axis.span(0)[0], spans))
    return Field(tuple(axes))


def _unshuffle_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    factor = arg(args, kwargs, 1, "downscale_factor")
    return Field(tuple(window(axis, factor, factor, 1, 0) for axis in f.axes))


def _window_rules() -> dict[str, WindowRule]:
    rules: dict[str, WindowRule] = {}
    for n in (1, 2, 3):
        rules[f"conv{n}d"] = _conv_rule
        rules[f"conv_transpose{n}d"] = _conv_transpose_rule
        for name in (f"max_pool{n}d", f"max_pool{n}d_with_indices"):
            rules[name] = _pool_rule(kernel_at=1, dilation_at=4)
        rules[f"avg_pool{n}d"] = _pool_rule(kernel_at=1, dilation_at=None)
        for name in ("adaptive_avg_pool", "adaptive_max_pool"):
            rules[f"{name}{n}d"] = _adaptive_rule
        rules[f"adaptive_max_pool{n}d_with_indices"] = _adaptive_rule
    rules["pixel_unshuffle"] = _unshuffle_rule
    return rules


WINDOW_RULES = _window_rules()  # op name -> the rule of an op with a window
_RESAMPLERS = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle"}


def _resampled(axis: Axis, n: int, m: int, mode: str) -> Axis:
    """Upsampling n -> m positions: exact for a whole factor (nearest: each output copies
    one input; bilinear without aligned corners: it blends the two inputs around
    (o + 0.5) / f - 0.5), else the sizes are kept and the jump scaled."""
    if m % n or m == n:
        return rescaled(axis, n, m)
    factor = m // n
    if mode not in ("bilinear", "linear", "bicubic", "trilinear"):
        return transposed(axis, factor, factor, 1, 0)
    period = factor * axis.period
    spans = []
    for o in range(period):
        x = (o + 0.5) / factor - 0.5
        left = math.floor(x)
        sources = [left, left + 1] if x > left else [left]
        spans.append(_union([axis.span(i) for i in sources]))
    return _build(period, axis.slope, spans)


def _follow(f: Field, x: Tensor, y: Tensor, name: str, args: tuple, kwargs: dict) -> Field:
    """The field of ``y`` from input ``x`` through an op without a window (same rank)."""
    rank = len(f.axes)
    sizes = list(zip(x.shape[-rank:], y.shape[-rank:], strict=True))
    if name in _RESAMPLERS:
        mode = "nearest" if name == "pixel_shuffle" else arg(args, kwargs, 3, "mode", "nearest")
        return Field(
            tuple(_resampled(a, n, m, mode) for a, (n, m) in zip(f.axes, sizes, strict=True))
        )
    if name == "__getitem__":
        slices = _slices(args[1], x.shape)
        if slices is not None:
            starts_steps = slices[-rank:]
            return Field(
                tuple(
                    window(a, 1, step, 1, -start)
                    for a, (start, step) in zip(f.axes, starts_steps, strict=True)
                )
            )
    if name == "pad":  # F.pad: (left, right, top, bottom, ...) from the last axis backwards
        pads = list(arg(args, kwargs, 1, "pad", ()))
        lefts = [pads[2 * i] if 2 * i < len(pads) else 0 for i in range(rank)][::-1]
        return Field(tuple(window(a, 1, 1, 1, left) for a, left in zip(f.axes, lefts, strict=True)))
    axes = []
    for axis, (n, m) in zip(f.axes, sizes, strict=True):
        if m == n:
            axes.append(axis)
        elif m == 1:  # an axis reduced to one value (a mean over H and W)
            axes.append(whole(axis, n))
        else:
            axes.append(rescaled(axis, n, m))
    return Field(tuple(axes))


def _slices(index: Any, shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """(start, step) per dimension of a basic-slicing index, or None for other indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(isinstance(item, slice) or item is Ellipsis for item in items):
        return None
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items = items[:at] + [slice(None)] * (len(shape) - len(items) + 1) + items[at + 1 :]
    items += [slice(None)] * (len(shape) - len(items))
    found = []
    for item, size in zip(items, shape, strict=True):
        start, _, step = item.indices(size)
        found.append((start, step))
    return found


def _merge(fields: list[tuple[Field, tuple[bool, ...]]], sizes: Sequence[int]) -> Field:
    """Where branches meet: each position sees what any branch sees there. A branch
    broadcast along an axis (a (B, C, 1, 1) gate) has one value for every position, so it
    adds its whole field to each of the ``sizes`` real positions."""
    axes = []
    for i, size in enumerate(sizes):
        spread = [f.axes[i] for f, broadcast in fields if not broadcast[i]]
        gates = [f.axes[i] for f, broadcast in fields if broadcast[i]]
        base = merged(spread or [gates[0]])
        if spread and gates:
            gate = _union([g.span(0) for g in gates])
            spans = [_union([base.span(o), gate]) for o in range(size)]
            base = _build(size, base.slope * size / base.period, spans)
        axes.append(base)
    return Field(tuple(axes))


def _broadcast(x: Tensor, y: Tensor, rank: int) -> tuple[bool, ...]:
    return tuple(n == 1 < m for n, m in zip(x.shape[-rank:], y.shape[-rank:], strict=True))


def field_after(
    name: str, sources: Sequence[tuple[Tensor, Field]], y: Tensor, args: tuple, kwargs: dict
) -> Field | None:
    """The field of ``y``, an output of the op ``name`` without a window, from its input
    tensors and their fields: each input of ``y``'s rank followed through the op, then
    merged. None when no input has that rank: a change of rank (flatten, a mean without
    keepdim) ends the spatial field."""
    fields = [
        (_follow(f, x, y, name, args, kwargs), _broadcast(x, y, len(f.axes)))
        for x, f in sources
        if x.dim() == y.dim()
    ]
    if not fields:
        return None
    return _merge(fields, y.shape[-len(fields[0][0].axes) :])


class _FieldRow(Protocol):
    name: str
    output_shape: list[int]
    rf: float | None
    rf_min: float | None
    jump: float | None


@dataclass(frozen=True)
class FeatureField:
    """A model's receptive field, as ``summary`` and ``compare`` both report it: that of the
    last output with more than one position (the features, before any global pool or
    dense layer), with its output stride. ``mixed_after`` says whether later layers (a
    global pool, a flatten and dense layers) mix every position, so that the model's final
    outputs each see the whole input, whatever the arithmetic of their windows says."""

    layer: str
    largest: float
    smallest: float
    stride: float
    mixed_after: bool

    def note(self) -> str:
        """For a footer: why the field stops growing at ``layer`` ('' at the last layer)."""
        if not self.mixed_after:
            return ""
        return (
            f"at {self.layer}, the last map of more than one position; the global pool or"
            " dense layers after it mix them all: every output sees the whole input"
        )


def positions(shape: Sequence[int]) -> int:
    """Spatial positions of an output shape without its batch axis (C, H, W, ...)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def sees_whole_input(row: _FieldRow, input_size: Sequence[int]) -> bool:
    """Whether ``row`` is a one-position output whose window covers the whole input (a
    global pool: its arithmetic field, e.g. 619 px for ResNet-50 at 224, overhangs)."""
    if row.rf is None or not row.output_shape or positions(row.output_shape) != 1:
        return False
    return row.rf >= max(input_size[1:], default=1)


def feature_field(rows: Sequence[_FieldRow]) -> FeatureField | None:
    """The ``FeatureField`` of a summary's rows (None when no row is spatial)."""
    spatial = [i for i, r in enumerate(rows) if r.rf is not None and positions(r.output_shape) > 1]
    if not spatial:
        fields_ = [i for i, r in enumerate(rows) if r.rf is not None]
        if not fields_:
            return None
        spatial = fields_[-1:]
    index = spatial[-1]
    row = rows[index]
    return FeatureField(
        layer=row.name,
        largest=row.rf,  # type: ignore[arg-type]
        smallest=row.rf_min if row.rf_min is not None else row.rf,  # type: ignore[arg-type]
        stride=row.jump if row.jump is not None else 1.0,
        mixed_after=any(r.output_shape for r in rows[index + 1 :]),  # [] never ran
    )
