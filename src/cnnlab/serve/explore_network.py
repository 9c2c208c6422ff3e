"""What ``cnnlab explore`` shows of a network before any image: its layers with the
inspector's numbers, the blocks they sit in, the joins where branches meet, and the exact
receptive field of any unit (``Network``; ``cnnlab.serve.explore.Explored`` adds the
weights and the images).

The layer rows are ``summarize``'s, so every formula reads exactly as ``cnnlab summary
--format json`` prints it. One more forward pass (on the meta device where the model runs
there: no weights, no memory) follows the receptive field of every row's output with the
inspector's ``FieldTracker`` and notes every addition or concatenation of maps (ResNet's
``+ x``, DenseNet's concatenation) with the rows that produced its inputs.

The field of a unit is the inspector's exact one (``receptive_field.Axis.span``): the first
and last input pixel the unit sees along each axis, which may lie outside the input where
padding is; its centre is the middle of that span (Araujo et al., "Computing Receptive
Fields of Convolutional Neural Networks", Distill 2019).
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.inspect.receptive_field import Field
from cnnlab.inspect.rows import LayerRow
from cnnlab.inspect.summary import Summary
from cnnlab.inspect.tracker import FieldTracker, tensors_in


class BadRequest(CnnlabError):
    """A layer, unit, class or image the explored model has not (a 400 on the API)."""


def is_container_only(module: nn.Module) -> bool:
    """A module without a forward of its own (a plain ModuleList or ModuleDict) only holds
    others: it is no level of ``cnnlab summary --depth`` (summary.py counts levels alike)."""
    return type(module).forward is nn.Module.forward


def block_levels(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Every module that is a level of ``--depth``: name -> (class name, its depth; the
    model's children are depth 1)."""
    levels: dict[str, int] = {"": 0}
    found = {}
    for name, module in model.named_modules():
        if not name:
            continue
        parent = levels[name.rpartition(".")[0]]
        if is_container_only(module):
            levels[name] = parent
            continue
        levels[name] = parent + 1
        found[name] = (type(module).__name__, parent + 1)
    return found


@dataclass
class Traced:
    """What the second forward pass found: each row's output field, and the joins."""

    fields: list[Field | None]
    joins: list[dict]


def trace(model: nn.Module, rows: list[LayerRow], x: Tensor) -> Traced:
    """Follow ``x`` through ``model``: the receptive field of each row's output (rows
    matched by module name and call count, as ``summarize`` makes them) and each add or
    concatenation of maps, with the block whose forward made it, the row after which it
    happens and the rows whose outputs it joins (-1: the input; None: a tensor no row
    produced, e.g. a functional operation's)."""
    index_of: dict[tuple[str, int], int] = {}
    seen: Counter[str] = Counter()
    for i, row in enumerate(rows):
        index_of[(row.name, seen[row.name])] = i
        seen[row.name] += 1
    fields: list[Field | None] = [None] * len(rows)
    joins: list[dict] = []
    producer: dict[int, tuple[weakref.ref, int]] = {}
    calls: Counter[str] = Counter()
    stack: list[str] = []
    done = [-1]  # the last row whose output is known

    def made_by(tensor: Tensor) -> int | None:
        entry = producer.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def on_merge(name: str, inputs: list[Tensor], output: Tensor) -> None:
        if output.dim() < 3:
            return
        joins.append(
            {
                "kind": "concat" if name in ("cat", "concat", "concatenate") else "add",
                "block": stack[-1] if stack else "",
                "after": done[0],
                "from": [made_by(t) for t in inputs],
                "inputs": [list(t.shape[1:]) for t in inputs],
                "output": list(output.shape[1:]),
            }
        )

    tracker = FieldTracker(lambda _macs: None, on_merge)
    handles = []
    for name, module in model.named_modules():
        label = name or type(module).__name__

        def enter(_m: nn.Module, _args: Any, label: str = label) -> None:
            stack.append(label)

        def leave(_m: nn.Module, _args: Any, output: Any, label: str = label) -> None:
            stack.pop()
            i = index_of.get((label, calls[label]))
            calls[label] += 1
            tensor = next(tensors_in(output), None)
            if i is None or tensor is None:
                return
            fields[i] = tracker.field(tensor)
            producer[id(tensor)] = (weakref.ref(tensor), i)
            done[0] = max(done[0], i)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        producer[id(x)] = (weakref.ref(x), -1)
        with torch.no_grad(), tracker:
            tracker.start(x)
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return Traced(fields, joins)


def trace_summary(model: nn.Module, summary: Summary, size: tuple[int, int, int]) -> Traced:
    """``trace`` of a zero input on the model's own device and dtype (the meta device for
    a model without weights: no memory)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *size, device=device, dtype=dtype)
    return trace(model, summary.layers, x)


@dataclass
class Network:
    """One explored network's description: its summary rows, blocks, joins and fields."""

    spec: str
    input_size: tuple[int, int, int]
    summary: Summary
    traced: Traced
    blocks: dict[str, tuple[str, int]]
    structure: nn.Module  # the model as summarised (on the meta device: no weights)
    run: Any = None  # a cnnlab.runs.Run for a run folder

    # ---- the layers ----------------------------------------------------------------------

    def document(self) -> dict:
        """``cnnlab summary --format json``'s document, each layer with ``index``,
        ``blocks`` (the containers it sits in, outermost first), running totals and
        ``spatial``; and ``blocks`` (name -> type, depth, first and last row), ``joins``,
        the classes of a run."""
        document = self.summary.to_dict(self.spec)
        params = macs = 0
        spans: dict[str, list[int]] = {}
        for i, (layer, row) in enumerate(zip(document["layers"], self.summary.layers, strict=True)):
            params += row.params
            macs += row.macs
            inside = [name for name in _prefixes(row.name) if name in self.blocks]
            for name in inside:
                spans.setdefault(name, [i, i])[1] = i
            layer.update(
                index=i,
                blocks=inside,
                params_so_far=params,
                macs_so_far=macs,
                spatial=self.is_spatial(i),
            )
        document["blocks"] = {
            name: {"type": self.blocks[name][0], "depth": self.blocks[name][1], "rows": span}
            for name, span in spans.items()
        }
        document["joins"] = self.traced.joins
        document["classes"] = list(self.run.classes) if self.run is not None else None
        document["task"] = self.run.task.name if self.run is not None else None
        return document

    def row(self, index: int) -> LayerRow:
        if not 0 <= index < len(self.summary.layers):
            raise BadRequest(
                f"layer {index}: {self.spec} has layers 0 to {len(self.summary.layers) - 1}"
            )
        return self.summary.layers[index]

    def is_spatial(self, index: int) -> bool:
        shape = self.summary.layers[index].output_shape
        return len(shape) == 3 and self.traced.fields[index] is not None

    # ---- one unit's field -----------------------------------------------------------------

    def unit_field(self, index: int, y: int, x: int) -> dict:
        """The input pixels unit (y, x) of row ``index``'s output sees: ``box`` [x0, y0,
        x1, y1] (first and last pixel, inclusive; outside the input where padding is),
        ``inside`` the same box clipped to the input, ``centre`` [x, y], and ``chain``, the
        rows before it where the field grows, with their sizes."""
        row = self.row(index)
        found = self.traced.fields[index]
        if found is None or len(row.output_shape) != 3 or len(found.axes) != 2:
            raise BadRequest(f"layer {index} ({row.name}) has no spatial output: no units to pick")
        _, height, width = row.output_shape
        if not (0 <= y < height and 0 <= x < width):
            raise BadRequest(f"unit (y {y}, x {x}) is outside layer {index}'s {height}x{width} map")
        y0, y1 = found.axes[0].span(y)
        x0, x1 = found.axes[1].span(x)
        if x0 > x1 or y0 > y1:
            raise BadRequest(f"unit (y {y}, x {x}) of layer {index} sees no input pixel")
        _, in_h, in_w = self.input_size
        inside = [max(x0, 0), max(y0, 0), min(x1, in_w - 1), min(y1, in_h - 1)]
        return {
            "layer": index,
            "name": row.name,
            "unit": [y, x],
            "box": [_plain(v) for v in (x0, y0, x1, y1)],
            "inside": [_plain(v) for v in inside],
            "centre": [_plain((x0 + x1) / 2), _plain((y0 + y1) / 2)],
            "size": [_plain(x1 - x0 + 1), _plain(y1 - y0 + 1)],
            "jump": [_plain(found.axes[1].jump), _plain(found.axes[0].jump)],
            "input": list(self.input_size),
            "chain": self.chain(index),
        }

    def chain(self, index: int) -> list[dict]:
        """The rows up to ``index`` where the receptive field grows (or the jump does): the
        chain of sizes that leads to its field. ``step`` says how, for a window of kernel k
        (dilated: its span) after a jump j: ``rf + (k - 1)*j``, Araujo et al.'s recurrence."""
        chain: list[dict] = []
        rf, jump = 1.0, 1.0
        modules = dict(self.structure.named_modules())
        for i in range(index + 1):
            row = self.summary.layers[i]
            if row.rf is None or row.jump is None or (row.rf <= rf and row.jump <= jump):
                continue
            step = f"{_plain(rf)} -> {_plain(row.rf)}"
            kernel = _kernel_span(modules.get(row.name))
            if kernel is not None and rf + (kernel - 1) * jump == row.rf:
                step = f"{_plain(rf)} + ({kernel} - 1)*{_plain(jump)} = {_plain(row.rf)}"
            chain.append(
                {
                    "layer": i,
                    "name": row.name,
                    "type": row.type,
                    "output": row.output_shape,
                    "rf": _plain(row.rf),
                    "jump": _plain(row.jump),
                    "step": step,
                }
            )
            rf, jump = max(rf, row.rf), max(jump, row.jump)
        return chain

    def activation_bytes(self) -> int:
        """An upper bound of a forward pass's activations (every row's output kept)."""
        elements = sum(math.prod(row.output_shape) for row in self.summary.layers)
        return 4 * (elements + math.prod(self.input_size))


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _kernel_span(module: nn.Module | None) -> int | None:
    """The input span of a convolution's or pooling's window along its larger axis."""
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return None
    sizes = kernel if isinstance(kernel, tuple) else (kernel,)
    dilation = getattr(module, "dilation", 1)
    dilations = dilation if isinstance(dilation, tuple) else (dilation,) * len(sizes)
    return max(d * (k - 1) + 1 for k, d in zip(sizes, dilations, strict=False))


def _plain(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 4)
