"""Multiply-accumulates of the torch functions a forward pass calls (conv, transposed conv,
linear, matmul, attention, normalisation), for the whole batch.

MACs follow torchinfo's "Mult-Adds" where it is right: convolution ``out_elements *
(cin/groups) * kh * kw``, linear ``in * out`` per row, normalisation ``batch * (weight +
bias elements)``, local response normalisation ``size`` per element, activations and
pooling 0. Bias additions are not multiplies and are
left out (torchinfo adds them: well under 1% on classic CNNs). A transposed convolution
costs ``in_elements * (cout/groups) * kh * kw`` (torchinfo uses the output size there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A torch function's argument, given by position or by name."""
    return args[index] if len(args) > index else kwargs.get(name, default)


# A MAC rule maps (args, kwargs, output) to multiply-accumulates for the whole batch.
MacRule = Callable[[tuple, dict, Any], int]


def _conv_macs(args: tuple, kwargs: dict, out: Any) -> int:
    weight = arg(args, kwargs, 1, "weight")  # (cout, cin/groups, *kernel)
    return out.numel() * math.prod(weight.shape[1:])


def _conv_transpose_macs(args: tuple, kwargs: dict, out: Any) -> int:
    # Every input element is scattered through a (cout/groups, *kernel) slice of the weight.
    weight = arg(args, kwargs, 1, "weight")  # (cin, cout/groups, *kernel)
    return args[0].numel() * math.prod(weight.shape[1:])


def _linear_macs(args: tuple, kwargs: dict, out: Any) -> int:
    weight = arg(args, kwargs, 1, "weight")  # (out, in)
    return args[0].numel() * weight.shape[0]


def _matmul_macs(args: tuple, kwargs: dict, out: Any) -> int:
    return out.numel() * args[0].shape[-1]


def _attention_macs(args: tuple, kwargs: dict, out: Any) -> int:
    query, key, value = args[:3]  # (..., L, E), (..., S, E), (..., S, Ev)
    return math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def _norm_macs(weight_at: int) -> MacRule:
    # torchinfo's convention: batch * (weight + bias elements), not per element.
    def rule(args: tuple, kwargs: dict, out: Any) -> int:
        weight = arg(args, kwargs, weight_at, "weight")
        bias = arg(args, kwargs, weight_at + 1, "bias")
        count = sum(t.numel() for t in (weight, bias) if isinstance(t, Tensor))
        return out.shape[0] * count if out.dim() > 1 else count

    return rule


def _lrn_macs(args: tuple, kwargs: dict, out: Any) -> int:
    # Local response normalisation (AlexNet): each output sums the squares of ``size``
    # neighbouring channels before it divides, so ``size`` multiply-adds per element
    # (torchinfo and fvcore count it as 0).
    return out.numel() * arg(args, kwargs, 1, "size")


def _mac_rules() -> dict[str, MacRule]:
    rules: dict[str, MacRule] = {"linear": _linear_macs}
    for n in (1, 2, 3):
        rules[f"conv{n}d"] = _conv_macs
        rules[f"conv_transpose{n}d"] = _conv_transpose_macs
    for name in ("matmul", "__matmul__", "mm", "bmm"):
        rules[name] = _matmul_macs
    rules["scaled_dot_product_attention"] = _attention_macs
    rules["batch_norm"] = rules["instance_norm"] = _norm_macs(weight_at=3)
    rules["layer_norm"] = rules["group_norm"] = _norm_macs(weight_at=2)
    rules["local_response_norm"] = _lrn_macs
    return rules


MAC_RULES = _mac_rules()
