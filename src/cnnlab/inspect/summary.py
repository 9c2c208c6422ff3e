"""Per-layer summary of any ``nn.Module``: output shape, parameters and their formula, MACs,
FLOPs, receptive field and jump (and, with ``with_memory``, the memory of a training step).

Two mechanisms cooperate during one forward pass: module hooks record one row per layer
call, in execution order, and ``FieldTracker`` (``receptive_field.py``) sees every torch
function the forward pass calls, counting MACs and following the receptive field of every
tensor, so branches and functional code inside ``forward`` are handled without knowing the
architecture. ``FlopCounter`` (``flops.py``) sees the aten operations below them, counts
their FLOPs and lists those it cannot count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.errors import CnnlabError
from cnnlab.inspect.flops import FlopCounter
from cnnlab.inspect.memory import MemoryEstimate, activations_per_row, memory_document
from cnnlab.inspect.receptive_field import (
    FeatureField,
    Field,
    FieldTracker,
    feature_field,
    tensors_in,
)
from cnnlab.inspect.sizes import merge_formula, size_formula
from cnnlab.models.factory import create_model, model_info
from cnnlab.registry import check_input_size


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


@dataclass
class Summary:
    """What ``summarize`` found; ``weight_mb`` counts parameters and buffers."""

    input_size: tuple[int, ...]
    batch_size: int
    layers: list[LayerRow]
    total_params: int  # each parameter once, even when shared
    trainable_params: int
    total_macs: int
    weight_mb: float  # bytes of parameters + buffers (running stats), / 1e6
    # The receptive field and output stride as ``receptive_field.feature_field`` defines
    # them: of the last output with more than one position (before any global pool).
    receptive_field: float | None  # the largest
    receptive_field_min: float | None  # and its smallest, where it depends on the position
    depth: int  # layers with weights (conv, linear) on the longest path through the model
    output_stride: float | None  # input pixels between neighbours of that map
    dense_params: int = 0  # in fully connected (nn.Linear) layers: AlexNet's 96%
    features: FeatureField | None = None  # the layer it is read at, and what comes after it
    total_flops: int = 0
    flops_by_kind: dict[str, int] = field(default_factory=dict)  # multiply_add, bias, ...
    not_counted: dict[str, int] = field(default_factory=dict)  # aten op -> times it ran
    memory: MemoryEstimate | None = None  # set by ``with_memory``
    train: bool = False  # whether the training step's figures are shown (``--train``)

    def __str__(self) -> str:
        """The table as ``cnnlab summary`` prints it, 100 columns wide."""
        from cnnlab.inspect.render import render_text

        return render_text(self, width=100)

    def _repr_html_(self) -> str:
        """An HTML table for notebooks (Jupyter calls this)."""
        from cnnlab.inspect.render import render_html

        return render_html(self)

    def to_dict(self, model_name: str) -> dict[str, Any]:
        """A JSON-serialisable document (the schema of ``cnnlab summary --format json``)."""
        layers = []
        for row in self.layers:
            layer = asdict(row)
            for key in ("rf", "rf_min", "jump"):
                layer[key] = plain(getattr(row, key))
            layers.append(layer)
        return {
            "model": model_name,
            "input": list(self.input_size),
            "layers": layers,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "dense_params": self.dense_params,
            "total_macs": self.total_macs,
            "receptive_field": plain(self.receptive_field),
            "receptive_field_min": plain(self.receptive_field_min),
            "depth": self.depth,
            "output_stride": plain(self.output_stride),
            "receptive_field_at": self.features.layer if self.features else None,
            "whole_input_after": self.features.mixed_after if self.features else False,
            "weight_mb": round(self.weight_mb, 3),
            "total_flops": self.total_flops,
            "flops_by_kind": dict(self.flops_by_kind),
            "not_counted": dict(self.not_counted),
            **({} if self.memory is None else memory_document(self.memory, self.train)),
        }


def summarize_model(
    name: str,
    input_size: tuple[int, int, int] | None = None,
    depth: int | None = None,
    **builder_args: Any,
) -> tuple[Summary, tuple[int, int, int]]:
    """Build the registered model ``name`` for ``input_size`` (default: its natural input;
    its channels become ``in_channels``, its size the ``img_size`` of a model built for
    one) and summarise it. Returns (summary, the input size used)."""
    info = model_info(name)
    input_size = tuple(input_size or info.input_size)
    builder_args.setdefault("in_channels", input_size[0])
    if info.takes_img_size:
        builder_args.setdefault("img_size", (input_size[1], input_size[2]))
    model = create_model(name, **builder_args)
    return summarize(model, input_size=input_size, depth=depth), input_size


def summarize(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 224, 224),
    depth: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> Summary:
    """Run one forward pass on zeros of shape ``(batch_size, *input_size)`` and summarise it.

    Rows are the leaf modules in execution order (a module called twice gives two rows).
    ``depth`` works like torchinfo's: a container at that depth (the model's children are
    depth 1) becomes one row with its layers' parameters and MACs summed. The model runs
    in eval mode under ``torch.no_grad``; every module's training flag is restored. The
    input is created on ``device``, where the model must already be.

    MACs are for the whole batch and follow torchinfo's "Mult-Adds" where it is right:
    convolution ``out_elements * (cin/groups) * kh * kw``, linear ``in * out`` per row,
    normalisation ``batch * (weight + bias elements)``, activations and pooling 0. Bias
    additions are not multiplies and are left out (torchinfo adds them: well under 1% on
    classic CNNs). A transposed convolution costs ``in_elements * (cout/groups) * kh * kw``
    (torchinfo uses the output size there).

    The receptive field and jump of a row are in input pixels, for the spatial axis with
    the larger field; after an upsampling the field depends on the output position, and
    ``rf`` is the largest, ``rf_min`` the smallest (``receptive_field.py``). Adaptive and
    global pooling widen the field by the pooled window, so after a global pool it spans
    the whole input. Each row's ``size_formula`` says why it has its size (``sizes.py``).
    A module that never runs in eval mode (GoogLeNet's auxiliary heads) still gets a row,
    with its parameters, so that the rows add up to the totals.

    Raises the registry's ``InputSizeError`` for inputs the model does not accept and
    ``CnnlabError`` for any other failure of the forward pass.
    """
    if len(input_size) == 3:
        check_input_size(model, *input_size[1:])
    recorder = _Recorder(depth)
    tracker = FieldTracker(recorder.add_macs, recorder.add_merge)
    counter = FlopCounter(recorder.add_flops)
    recorder.field_of = tracker.field
    handles = recorder.attach(model)
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        x = torch.zeros(batch_size, *input_size, device=device, dtype=_float_dtype(model))
        with torch.no_grad(), tracker, counter:
            tracker.start(x)
            output = model(x)
        depth = max((tracker.depth(t) for t in tensors_in(output)), default=0)
    except CnnlabError:
        raise
    except Exception as error:
        raise CnnlabError(_failure_line(model, input_size, error, recorder)) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    recorder.add_uncalled(model)
    summary = _totals(model, tuple(input_size), batch_size, recorder.rows, tracker.total_macs)
    summary.depth = depth
    summary.total_flops = counter.total
    summary.flops_by_kind = dict(counter.by_kind)
    summary.not_counted = dict(sorted(counter.not_counted.items()))
    return summary


def with_memory(summary: Summary, memory: MemoryEstimate, train: bool = False) -> Summary:
    """``summary`` with ``memory`` (``memory.estimate_memory``): each row's activation bytes,
    and with ``train`` the whole training step in its JSON and footer."""
    names = [row.name for row in summary.layers]
    for row, saved in zip(summary.layers, activations_per_row(names, memory), strict=True):
        row.activation_bytes = saved
    summary.memory, summary.train = memory, train
    return summary


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
class _Recorder:
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
            params, formula = _count(module, recurse=True)
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
                params, formula = _count(module, recurse=True)
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
                params, formula = _count(module, recurse=False)
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


def _count(module: nn.Module, recurse: bool) -> tuple[int, str]:
    """Parameters of a module and the formula that gives them."""
    if recurse and next(module.children(), None) is not None:
        return _container_count(module)
    params = dict(module.named_parameters(recurse=False))
    total = sum(p.numel() for p in params.values())
    if not total:
        return 0, ""
    terms = _layer_terms(module, params) or [_shape_term(p) for p in params.values()]
    return total, f"{' + '.join(terms)} = {total:,}"


def _container_count(module: nn.Module) -> tuple[int, str]:
    total = sum(p.numel() for p in module.parameters())
    if not total:
        return 0, ""
    parts = [n for m in module.modules() if (n := sum(p.numel() for p in m.parameters(False)))]
    if len(parts) > 4:
        return total, f"sum of {len(parts)} layers = {total:,}"
    return total, f"{' + '.join(f'{n:,}' for n in parts)} = {total:,}"


def _layer_terms(module: nn.Module, params: dict[str, Tensor]) -> list[str] | None:
    """The textbook formula for conv, linear and normalisation layers, term by term."""
    if "weight" not in params or set(params) - {"weight", "bias"}:
        return None
    weight, bias = params["weight"], params.get("bias")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight: (cin, cout/groups, *kernel)
        cout = f"({module.out_channels}/{module.groups})" if module.groups > 1 else weight.shape[1]
        term = "*".join(map(str, [*weight.shape[2:], weight.shape[0], cout]))
    elif isinstance(module, nn.modules.conv._ConvNd):
        # weight: (cout, cin/groups, *kernel)
        cin = f"({module.in_channels}/{module.groups})" if module.groups > 1 else weight.shape[1]
        term = "*".join(map(str, [*weight.shape[2:], cin, weight.shape[0]]))
    elif isinstance(module, nn.Linear):
        term = f"{weight.shape[1]}*{weight.shape[0]}"
    elif _is_norm(module) and bias is not None and bias.shape == weight.shape:
        return [f"2*{weight.numel()}"]
    else:
        return None
    return [term] if bias is None else [term, str(bias.numel())]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm)


def _shape_term(tensor: Tensor) -> str:
    return "*".join(map(str, tensor.shape)) or "1"


def _totals(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int,
    rows: list[LayerRow],
    total_macs: int,
) -> Summary:
    params = list(model.parameters())  # shared parameters appear once
    tensors = [*params, *model.buffers()]
    found = feature_field(rows)
    return Summary(
        input_size=input_size,
        batch_size=batch_size,
        layers=rows,
        total_params=sum(p.numel() for p in params),
        dense_params=sum(
            p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()
        ),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_macs=total_macs,
        weight_mb=sum(t.numel() * t.element_size() for t in tensors) / 1e6,
        receptive_field=found.largest if found else None,
        receptive_field_min=found.smallest if found else None,
        depth=0,
        output_stride=found.stride if found else None,
        features=found,
    )


def _float_dtype(model: nn.Module) -> torch.dtype:
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floating, torch.get_default_dtype())


FAILURE_LAYERS_SHOWN = 3  # the layers that ran last, named when a forward pass fails


def _failure_line(
    model: nn.Module,
    input_size: tuple[int, ...],
    error: Exception,
    recorder: _Recorder | None = None,
) -> str:
    """One line: the model, the layer it failed in (module path, type, input shape, as
    torchinfo's list of the layers that ran shows) and the last layers that ran."""
    name = getattr(model, "model_name", type(model).__name__)
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    line = f"{name} failed on input {','.join(map(str, input_size))}"
    frames = recorder._stack if recorder is not None else []
    if frames and frames[-1].where:
        frame = frames[-1]
        shape = "x".join(map(str, frame.input_shape)) if frame.input_shape else "?"
        line += f" in {frame.where}, whose input is {shape}"
    line += f": {reason}"
    ran = [row for row in (recorder.rows if recorder else []) if row.output_shape]
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


def plain(value: float | None) -> int | float | None:
    """An int when whole, else a float rounded for JSON."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, 4)
