"""Floating-point operations of every aten operation a forward pass runs, and the list of
those it cannot count (``FlopCounter``), under one written convention (``FLOPS_LEGEND``).

The convention, per operation, for the whole batch:

- multiply-adds (convolution, transposed convolution, linear, mm/bmm/matmul, einsum through
  the bmm it runs): 2 per multiply-accumulate, so 2 x the MACs that fvcore counts;
- a bias: 1 per output element;
- pointwise arithmetic and activations (add, mul, ReLU, sigmoid, GELU, ...): 1 per output
  element; ``addcmul``/``addcdiv`` 2;
- pooling: 1 per window element per output (max: a comparison, average: an addition);
  adaptive pooling 1 per input element;
- normalisation: 2 per element where the statistics are fixed (batch norm in eval: a
  scale and a shift), 7 where it computes them (mean 1, variance 2, normalise 2, scale
  and shift 2); softmax 3 per element (exp, sum, divide); a reduction 1 per input element;
- moving or making data (view, cat, copy, padding, nearest upsampling, zeros): 0, counted.

Every other operation is "not counted" and listed with how many times it ran, never taken
as free without saying so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FLOPS_LEGEND = (
    "FLOPs: 2 per multiply-add (2 x MACs for conv/linear/matmul), 1 per bias, pointwise op"
    " or activation element, 1 per pooled window element, normalisation 2 per element"
    " (7 where it computes its statistics), softmax 3; data movement 0"
)

# A FLOP rule maps (args, kwargs, output) to (kind, floating-point operations).
FlopRule = Callable[[tuple, dict, Any], list[tuple[str, int]]]


def _numel(value: Any) -> int:
    return sum(t.numel() for t in tree_leaves(value) if isinstance(t, Tensor))


def _first(value: Any) -> Tensor:
    return next(t for t in tree_leaves(value) if isinstance(t, Tensor))


def _convolution(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    transposed = bool(args[6]) if len(args) > 6 else False
    # weight: (cout, cin/groups, *k); transposed (cin, cout/groups, *k): each input element
    # is scattered through a (cout/groups, *k) slice.
    macs = (x.numel() if transposed else out.numel()) * math.prod(weight.shape[1:])
    found = [("multiply_add", 2 * macs)]
    if isinstance(bias, Tensor):
        found.append(("bias", out.numel()))
    return found


def _mm(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
    return [("multiply_add", 2 * out.numel() * args[0].shape[-1])]


def _addmm(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
    # addmm(bias, x, w) and baddbmm(bias, x, w): a product plus a bias per output element.
    return [("multiply_add", 2 * out.numel() * args[1].shape[-1]), ("bias", out.numel())]


def _per_output(kind: str, factor: int = 1) -> FlopRule:
    return lambda args, kwargs, out: [(kind, factor * _numel(out))]


def _per_input(kind: str, factor: int = 1) -> FlopRule:
    return lambda args, kwargs, out: [(kind, factor * _first(args).numel())]


def _pool(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
    kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
    rank = _first(args).dim() - 2
    kernel = list(kernel) * (rank if len(kernel) == 1 else 1)
    return [("pooling", _first(out).numel() * math.prod(kernel))]


def _batch_norm(training_at: int | None) -> FlopRule:
    def rule(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
        training = training_at is not None and len(args) > training_at and args[training_at]
        return [("normalisation", (7 if training else 2) * args[0].numel())]

    return rule


def _free(args: tuple, kwargs: dict, out: Any) -> list[tuple[str, int]]:
    return []


def _words(text: str) -> list[str]:
    return text.split()


POINTWISE = _words(
    "add sub rsub mul div neg abs exp log log1p sqrt rsqrt reciprocal pow square relu relu6"
    " threshold clamp clamp_min clamp_max hardtanh sigmoid tanh gelu silu mish hardswish"
    " hardsigmoid leaky_relu elu selu celu softplus prelu _prelu_kernel maximum minimum"
    " where lerp erf sin cos"
)
MOVEMENT = _words(
    "view _unsafe_view reshape flatten t transpose permute expand squeeze unsqueeze slice"
    " select cat stack clone copy copy_ _to_copy contiguous detach alias split"
    " split_with_sizes chunk narrow unbind zeros zeros_like empty empty_like empty_strided"
    " ones ones_like full full_like fill fill_ zero_ new_zeros new_empty new_ones new_full"
    " as_strided lift_fresh constant_pad_nd pad repeat index_select upsample_nearest1d"
    " upsample_nearest2d upsample_nearest3d _unsafe_index channel_shuffle pixel_shuffle"
    " pixel_unshuffle scalar_tensor arange max_pool2d_with_indices_backward"
)


def _flop_rules() -> dict[str, FlopRule]:
    rules: dict[str, FlopRule] = {name: _free for name in MOVEMENT}
    for name in POINTWISE:
        rules[name] = rules[f"{name}_"] = _per_output("pointwise")
    for name in ("addcmul", "addcdiv"):
        rules[name] = rules[f"{name}_"] = _per_output("pointwise", 2)
    rules["convolution"] = rules["_convolution"] = _convolution
    rules["mm"] = rules["bmm"] = rules["matmul"] = _mm
    rules["addmm"] = rules["baddbmm"] = _addmm
    for n in (1, 2, 3):
        for name in (f"max_pool{n}d", f"max_pool{n}d_with_indices", f"avg_pool{n}d"):
            rules[name] = _pool
        for name in (f"adaptive_avg_pool{n}d", f"_adaptive_avg_pool{n}d"):
            rules[name] = _per_input("pooling")
        rules[f"adaptive_max_pool{n}d"] = _per_input("pooling")
    rules["_native_batch_norm_legit_no_training"] = _batch_norm(None)
    rules["_native_batch_norm_legit"] = _batch_norm(5)
    rules["native_batch_norm"] = rules["batch_norm"] = _batch_norm(5)
    rules["_native_batch_norm_legit_functional"] = _batch_norm(5)
    for name in ("native_layer_norm", "native_group_norm", "layer_norm", "group_norm"):
        rules[name] = _per_input("normalisation", 7)
    for name in ("_softmax", "softmax", "_log_softmax", "log_softmax"):
        rules[name] = _per_output("softmax", 3)
    for name in ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm"):
        rules[name] = _per_input("reduction")
    rules["native_dropout"] = rules["dropout"] = _per_output("pointwise")
    return rules


FLOP_RULES = _flop_rules()


def op_name(func: Any) -> str:
    """``aten.convolution`` for ``aten.convolution.default``."""
    packet = getattr(func, "overloadpacket", func)
    namespace = getattr(func, "namespace", "aten")
    return f"{namespace}.{getattr(packet, '__name__', str(packet))}"


class FlopCounter(TorchDispatchMode):
    """Sees every aten operation: adds its FLOPs (per kind, and through ``on_flops`` to
    whoever attributes them to a layer) or counts it in ``not_counted``."""

    def __init__(self, on_flops: Callable[[int], None] = lambda flops: None) -> None:
        super().__init__()
        self.on_flops = on_flops
        self.by_kind: Counter[str] = Counter()
        self.counted: Counter[str] = Counter()
        self.not_counted: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        packet = name.partition(".")[2]
        rule = FLOP_RULES.get(packet) if name.startswith("aten.") else None
        if rule is None:
            self.not_counted[name] += 1
            return out
        self.counted[name] += 1
        flops = 0
        for kind, value in rule(args, kwargs, out):
            self.by_kind[kind] += int(value)
            flops += int(value)
        if flops:
            self.on_flops(flops)
        return out
