"""The inspector's view of a forward pass: ``FieldTracker`` is a ``TorchFunctionMode`` that
sees every torch function the forward pass calls, counts its MACs (``cnnlab.inspect.macs``),
follows the depth in weighted layers, and gives each output tensor a receptive field derived
from its inputs' (the rules are ``cnnlab.inspect.receptive_field``'s).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from cnnlab.inspect.macs import MAC_RULES
from cnnlab.inspect.receptive_field import WINDOW_RULES, Axis, Field, field_after


class FieldTracker(TorchFunctionMode):
    """Sees every torch function of the forward pass: counts MACs and gives each output
    tensor a receptive field derived from its inputs; ``on_merge(name, inputs, output)`` is
    told of every add or concatenation of spatial maps (for the size formulas).

    Tensors are keyed by ``id`` with a weak reference, so a recycled id is never mistaken
    for the tensor that used to have it, and nothing is kept alive longer than the model
    keeps it.
    """

    # Layers with weights: the depth of a network counts them along its longest path.
    WEIGHTED = frozenset(
        {"linear", *(f"conv{n}d" for n in (1, 2, 3))} | {f"conv_transpose{n}d" for n in (1, 2, 3)}
    )
    MERGES = frozenset(
        {"add", "add_", "__add__", "__iadd__", "__radd__", "cat", "concat", "concatenate"}
    )

    def __init__(
        self,
        add_macs: Callable[[int], None],
        on_merge: Callable[[str, list[Tensor], Tensor], None] = lambda *_: None,
    ) -> None:
        super().__init__()
        self._add_macs = add_macs
        self._on_merge = on_merge
        self._fields: dict[int, tuple[weakref.ref, Field]] = {}
        self._depths: dict[int, tuple[weakref.ref, int]] = {}
        self.total_macs = 0

    def start(self, x: Tensor) -> None:
        if x.dim() >= 3:  # (B, C, *spatial)
            self._set(x, Field((Axis.pixels(),) * (x.dim() - 2)))

    def field(self, tensor: Tensor) -> Field | None:
        entry = self._fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def depth(self, tensor: Tensor) -> int:
        """Layers with weights on the longest path from the input to ``tensor``."""
        entry = self._depths.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else 0

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
        self._deepen(name, args, kwargs, out)
        return out

    def _deepen(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        deepest = max((self.depth(t) for t in tensors_in((args, kwargs))), default=0)
        depth = deepest + (name in self.WEIGHTED)
        if depth:
            for tensor in tensors_in(out):
                self._depths[id(tensor)] = (weakref.ref(tensor), depth)

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outputs = list(tensors_in(out))
        if not outputs:
            return
        rule = WINDOW_RULES.get(name)
        if rule is not None:
            x = args[0] if args else kwargs.get("input")
            f = self.field(x) if isinstance(x, Tensor) else None
            if f is not None and outputs[0].dim() == x.dim():
                self._set(outputs[0], rule(f, x, outputs[0], args, kwargs))
            return
        sources = [(t, f) for t in tensors_in((args, kwargs)) if (f := self.field(t)) is not None]
        if name in self.MERGES and len(sources) > 1:
            self._on_merge(name, [t for t, _ in sources], outputs[0])
        for y in outputs:
            found = field_after(name, sources, y, args, kwargs)
            if found is not None:
                self._set(y, found)


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
