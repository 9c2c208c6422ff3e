"""One row per layer call: ``LayerRow``, and the module hooks (``Recorder``) that record
the rows of ``summarize``'s forward pass in execution order, each with its parameters and
their formula (``params.py``), its size formula (``sizes.py``), its MACs and FLOPs and the
receptive field of its output (``tracker.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.inspect.params import param_formula
from cnnlab.inspect.receptive_field import Field
from cnnlab.inspect.sizes import merge_formula, size_formula
from cnnlab.inspect.tracker import tensors_in

FAILURE_LAYERS_SHOWN = 3  # the layers that ran last, named when a forward pass fails


@dataclass
class LayerRow:
    """One layer call: where it sits, what it produces and what it costs."""

    name: str  # module path, e.g. "layer1.0.conv1"
    type: str  # class name, e.g. "Conv2d"
    output_shape: list[int]  # without the batch dimension
    size_formula: str  # why it has that size, e.g. "(224 - 11 + 2*2)/4 + 1 = 55"
    params: int
    formula: str  # e.g. "3*3*128*64 + 64 = 73,792"; "" without parameters
    macs: int  # for the whole batch
    rf: float | None  # receptive field at the output, in input pixels; None if not spatial
    rf_min: float | None  # the smallest, where it depends on the position (upsampling)
    jump: float | None  # input pixels between neighbouring outputs (effective stride)
    flops: int = 0  # for the whole batch, by the convention of ``flops.FLOPS_LEGEND``
    activation_bytes: int | None = None  # saved for backward at ``with_memory``'s batch


def _never_called(module: nn.Module) -> bool:
    """A module without a forward of its own only holds others: a plain ModuleList or
    ModuleDict (a subclass with a forward, like DenseNet's DenseBlock, is a layer like any
    other), or the bare ``nn.Module`` that torch.fx's GraphModule (a cut backbone) puts at
    each level of the names of the leaves it calls directly."""
    return type(module).forward is nn.Module.forward


@dataclass
class _Frame:
    row: LayerRow | None  # None: a container expanded further
    input_shape: list[int] | None
    own_macs: int = 0  # MACs of functions a container calls itself, outside its children
    own_flops: int = 0
    merge: str | None = None  # the last add/concatenation its own forward made
    where: str = ""  # "layer1.0.conv1 (Conv2d)": named when the forward pass fails in it


@dataclass
class Recorder:
    """Module hooks that record one ``LayerRow`` a layer call (``attach``), with a stack of
    the modules running, so the MACs, FLOPs and merges the tracker and the FLOP counter
    report land in the row of the module that made them."""

    depth: int | None
    rows: list[LayerRow] = field(default_factory=list)
    field_of: Callable[[Tensor], Field | None] = lambda tensor: None
    _stack: list[_Frame] = field(default_factory=list)
    _watched: dict[str, nn.Module] = field(default_factory=dict)  # name -> module with hooks
    _entered: set[str] = field(default_factory=set)

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        levels = {"": 0}
        for name, module in model.named_modules():
            parent = name.rpartition(".")[0]
            if name and _never_called(module):
                levels[name] = levels[parent]  # never called: its items count as its parent's
                continue
            level = levels[name] = levels[parent] + 1 if name else 0
            if self.depth is not None and level > self.depth:
                continue  # inside a collapsed container: its row collects these
            is_leaf = next(module.children(), None) is None
            makes_row = is_leaf or level == self.depth
            label = name or type(module).__name__
            self._watched[name] = module
            enter = self._enter(name, label, module, makes_row)
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(self._leave(label, module)))
        return handles

    def add_macs(self, macs: int) -> None:
        if not self._stack:
            return
        frame = self._stack[-1]
        if frame.row is None:
            frame.own_macs += macs
        else:
            frame.row.macs += macs

    def add_flops(self, flops: int) -> None:
        if not self._stack:
            return
        frame = self._stack[-1]
        if frame.row is None:
            frame.own_flops += flops
        else:
            frame.row.flops += flops

    def add_merge(self, name: str, inputs: list[Tensor], output: Tensor) -> None:
        if self._stack and output.dim() >= 3:
            shapes = [list(t.shape) for t in inputs]
            self._stack[-1].merge = merge_formula(name, shapes, list(output.shape))

    def add_uncalled(self, model: nn.Module) -> None:
        """A row for each watched module the forward pass never reached whose parent it
        did (GoogLeNet's auxiliary heads in eval mode), so the rows add up to the totals."""
        for name, module in self._watched.items():
            parent = name.rpartition(".")[0]
            while parent and parent not in self._watched:  # through a ModuleList
                parent = parent.rpartition(".")[0]
            if not name or name in self._entered or parent not in self._entered:
                continue
            params, formula = param_formula(module, recurse=True)
            if params:
                self.rows.append(
                    LayerRow(
                        name,
                        type(module).__name__,
                        [],
                        "not run in eval mode",
                        params,
                        formula,
                        0,
                        None,
                        None,
                        None,
                    )
                )

    def _enter(
        self, name: str, label: str, module: nn.Module, makes_row: bool
    ) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any) -> None:
            self._entered.add(name)
            row = None
            if makes_row:
                params, formula = param_formula(module, recurse=True)
                row = LayerRow(
                    label, type(module).__name__, [], "", params, formula, 0, None, None, None
                )
                self.rows.append(row)
            tensor = next(tensors_in(args), None)
            shape = list(tensor.shape[1:]) if tensor is not None else None
            self._stack.append(_Frame(row, shape, where=f"{label} ({type(module).__name__})"))

        return hook

    def _leave(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            frame = self._stack.pop()
            row = frame.row
            if row is None:
                # A container's own parameters (e.g. a class token) or its own functional
                # MACs get a row, so rows add up to the totals.
                params, formula = param_formula(module, recurse=False)
                # (Its own FLOPs alone make no row: a functional ReLU or pool in a forward
                # stays in the totals, as torchinfo's rows have it.)
                if not params and not frame.own_macs:
                    return
                row = LayerRow(
                    name, type(module).__name__, [], "", params, formula, 0, None, None, None
                )
                row.macs, row.flops = frame.own_macs, frame.own_flops
                self.rows.append(row)
            tensor = next(tensors_in(output), None)
            if tensor is None:
                return
            row.output_shape = list(tensor.shape[1:])
            # A merge counts where the module's own forward made it, not inside a plain
            # Sequential's hidden children.
            merge = None if type(module).forward is nn.Sequential.forward else frame.merge
            row.size_formula = size_formula(module, frame.input_shape, row.output_shape, merge)
            found = self.field_of(tensor)
            if found is not None:
                row.rf, row.rf_min, row.jump = found.widest()

        return hook

    def failure_line(self, model: nn.Module, input_size: tuple[int, ...], error: Exception) -> str:
        """One line: the model, the layer it failed in (module path, type, input shape, as
        torchinfo's list of the layers that ran shows) and the last layers that ran."""
        name = getattr(model, "model_name", type(model).__name__)
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        line = f"{name} failed on input {','.join(map(str, input_size))}"
        frames = self._stack
        if frames and frames[-1].where:
            frame = frames[-1]
            shape = "x".join(map(str, frame.input_shape)) if frame.input_shape else "?"
            line += f" in {frame.where}, whose input is {shape}"
        line += f": {reason}"
        ran = [row for row in self.rows if row.output_shape]
        if ran:
            shown = ", ".join(
                f"{row.name} ({row.type}) -> {'x'.join(map(str, row.output_shape))}"
                for row in ran[-FAILURE_LAYERS_SHOWN:]
            )
            more = (
                f" (the last {FAILURE_LAYERS_SHOWN} of {len(ran)})"
                if len(ran) > FAILURE_LAYERS_SHOWN
                else ""
            )
            line += f"; layers that ran{more}: {shown}"
        return line
