"""Receptive field and jump of every tensor of a forward pass, through any architecture.

``FieldTracker`` is a ``TorchFunctionMode``: it sees every torch function the forward pass
calls, counts its MACs (``cnnlab.inspect.macs``) and gives each output tensor a receptive
field derived from its inputs': windows (conv, pooling) grow it, resampling rescales the
jump, and where branches meet (ResNet's add, Inception's and DenseNet's concatenation) the
widest field wins.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from cnnlab.inspect.macs import MAC_RULES, arg


@dataclass(frozen=True)
class Field:
    """Receptive field and jump per spatial axis, in input pixels (floats: transposed
    convolutions and upsampling make jumps fractional)."""

    rf: tuple[float, ...]
    jump: tuple[float, ...]

    def widest(self) -> tuple[float, float]:
        axis = max(range(len(self.rf)), key=self.rf.__getitem__)
        return self.rf[axis], self.jump[axis]


def window(f: Field, kernel: Any, stride: Any, dilation: Any) -> Field:
    """Conv or pooling: r_out = r_in + d*(k-1)*j_in, j_out = j_in*s."""
    rank = len(f.rf)
    k, s, d = ntuple(kernel, rank), ntuple(stride, rank), ntuple(dilation, rank)
    rf = tuple(r + di * (ki - 1) * j for r, j, ki, di in zip(f.rf, f.jump, k, d, strict=True))
    return Field(rf, tuple(j * si for j, si in zip(f.jump, s, strict=True)))


def transposed_window(f: Field, kernel: Any, stride: Any, dilation: Any) -> Field:
    """Transposed conv: j_out = j_in/s, r_out = r_in + d*(k-1)*j_out."""
    rank = len(f.rf)
    k, s, d = ntuple(kernel, rank), ntuple(stride, rank), ntuple(dilation, rank)
    jump = tuple(j / si for j, si in zip(f.jump, s, strict=True))
    rf = tuple(r + di * (ki - 1) * j for r, j, ki, di in zip(f.rf, jump, k, d, strict=True))
    return Field(rf, jump)


def ntuple(value: Any, rank: int) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (value,) * rank
    value = tuple(value)
    return value * rank if len(value) == 1 else value


# A window rule maps (field of the input, input, output, args, kwargs) to the output field.
WindowRule = Callable[[Field, Tensor, Tensor, tuple, dict], Field]


def _conv_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    kernel = arg(args, kwargs, 1, "weight").shape[2:]
    stride, dilation = arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 5, "dilation", 1)
    return window(f, kernel, stride, dilation)


def _conv_transpose_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    kernel = arg(args, kwargs, 1, "weight").shape[2:]
    stride, dilation = arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 7, "dilation", 1)
    return transposed_window(f, kernel, stride, dilation)


def _pool_rule(kernel_at: int, dilation_at: int | None) -> WindowRule:
    def rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
        kernel = arg(args, kwargs, kernel_at, "kernel_size")
        stride = arg(args, kwargs, kernel_at + 1, "stride") or kernel  # None or [] -> kernel
        dilation = 1 if dilation_at is None else arg(args, kwargs, dilation_at, "dilation", 1)
        return window(f, kernel, stride, dilation)

    return rule


def _adaptive_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    # Output i pools input[floor(i*n/m) : ceil((i+1)*n/m)]; the widest window is the kernel.
    rank = len(f.rf)
    sizes = zip(x.shape[-rank:], y.shape[-rank:], strict=True)
    kernel, stride = [], []
    for n, m in sizes:
        kernel.append(max(math.ceil((i + 1) * n / m) - (i * n) // m for i in range(m)))
        stride.append(n // m if n % m == 0 else n / m)
    return window(f, kernel, stride, 1)


def _unshuffle_rule(f: Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> Field:
    factor = arg(args, kwargs, 1, "downscale_factor")
    return window(f, factor, factor, 1)


def _window_rules() -> dict[str, WindowRule]:
    rules: dict[str, WindowRule] = {}
    for n in (1, 2, 3):
        rules[f"conv{n}d"] = _conv_rule
        rules[f"conv_transpose{n}d"] = _conv_transpose_rule
        for name in (f"max_pool{n}d", f"max_pool{n}d_with_indices"):
            rules[name] = _pool_rule(kernel_at=1, dilation_at=4)
        rules[f"avg_pool{n}d"] = _pool_rule(kernel_at=1, dilation_at=None)
        rules[f"lp_pool{n}d"] = _pool_rule(kernel_at=2, dilation_at=None)
        for name in ("adaptive_avg_pool", "adaptive_max_pool"):
            rules[f"{name}{n}d"] = _adaptive_rule
        rules[f"adaptive_max_pool{n}d_with_indices"] = _adaptive_rule
    rules["pixel_unshuffle"] = _unshuffle_rule
    return rules


_WINDOW_RULES = _window_rules()
# These resample: the field is unchanged, the jump scales by input/output size.
_RESAMPLERS = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle"}


def _follow(f: Field, x: Tensor, y: Tensor, name: str, args: tuple) -> Field:
    """The field of ``y`` from input ``x`` through an op without a window (same rank)."""
    rank = len(f.rf)
    sizes = list(zip(x.shape[-rank:], y.shape[-rank:], strict=True))
    if name in _RESAMPLERS:
        return Field(f.rf, tuple(j * n / m for j, (n, m) in zip(f.jump, sizes, strict=True)))
    steps = _slice_steps(args[1], x.dim())[-rank:] if name == "__getitem__" else None
    if steps is not None:
        return Field(f.rf, tuple(j * s for j, s in zip(f.jump, steps, strict=True)))
    # An axis reduced to one value (a mean over H and W) sees the whole axis.
    rf, jump = [], []
    for r, j, (n, m) in zip(f.rf, f.jump, sizes, strict=True):
        whole = m == 1 and n > 1
        rf.append(r + (n - 1) * j if whole else r)
        jump.append(j * n if whole else j)
    return Field(tuple(rf), tuple(jump))


def _slice_steps(index: Any, ndim: int) -> list[int] | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(isinstance(item, slice) or item is Ellipsis for item in items):
        return None
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1 :]
    items += [slice(None)] * (ndim - len(items))
    return [item.step or 1 for item in items]


def _widest(fields: list[tuple[Field, tuple[bool, ...]]]) -> Field:
    """Where branches meet, each axis takes the largest field, and the jump of the widest
    branch that is not broadcast along that axis (a (B, C, 1, 1) gate has no spacing)."""
    rf, jump = [], []
    for axis in range(len(fields[0][0].rf)):
        ranked = sorted(fields, key=lambda pair: pair[0].rf[axis], reverse=True)
        spaced = [f for f, broadcast in ranked if not broadcast[axis]] or [ranked[0][0]]
        rf.append(ranked[0][0].rf[axis])
        jump.append(spaced[0].jump[axis])
    return Field(tuple(rf), tuple(jump))


def _broadcast(x: Tensor, y: Tensor, rank: int) -> tuple[bool, ...]:
    return tuple(n == 1 < m for n, m in zip(x.shape[-rank:], y.shape[-rank:], strict=True))


class FieldTracker(TorchFunctionMode):
    """Sees every torch function of the forward pass: counts MACs and gives each output
    tensor a receptive field derived from its inputs'.

    Tensors are keyed by ``id`` with a weak reference, so a recycled id is never mistaken
    for the tensor that used to have it, and nothing is kept alive longer than the model
    keeps it.
    """

    def __init__(self, add_macs: Callable[[int], None]) -> None:
        super().__init__()
        self._add_macs = add_macs
        self._fields: dict[int, tuple[weakref.ref, Field]] = {}
        self.total_macs = 0

    def start(self, x: Tensor) -> None:
        if x.dim() >= 3:  # (B, C, *spatial)
            rank = x.dim() - 2
            self._set(x, Field((1.0,) * rank, (1.0,) * rank))

    def field(self, tensor: Tensor) -> Field | None:
        entry = self._fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _set(self, tensor: Tensor, f: Field) -> None:
        self._fields[id(tensor)] = (weakref.ref(tensor), f)

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        count = MAC_RULES.get(name)
        if count is not None:
            macs = int(count(args, kwargs, out))
            self.total_macs += macs
            self._add_macs(macs)
        self._propagate(name, args, kwargs, out)
        return out

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outputs = list(tensors_in(out))
        if not outputs:
            return
        rule = _WINDOW_RULES.get(name)
        if rule is not None:
            x = args[0] if args else kwargs.get("input")
            f = self.field(x) if isinstance(x, Tensor) else None
            if f is not None and outputs[0].dim() == x.dim():
                self._set(outputs[0], rule(f, x, outputs[0], args, kwargs))
            return
        sources = [(t, f) for t in tensors_in((args, kwargs)) if (f := self.field(t)) is not None]
        for y in outputs:
            # A change of rank (flatten, a mean without keepdim) ends the spatial field.
            fields = [
                (_follow(f, x, y, name, args), _broadcast(x, y, len(f.rf)))
                for x, f in sources
                if x.dim() == y.dim()
            ]
            if fields:
                self._set(y, _widest(fields))


def tensors_in(value: Any) -> Iterator[Tensor]:
    """Tensors inside nested tuples, lists and dicts, in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
