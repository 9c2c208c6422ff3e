"""Per-layer summary of any ``nn.Module``: output shape, parameters and their formula, MACs,
receptive field and jump.

Two mechanisms cooperate during one forward pass:

* module hooks record one row per layer call, in execution order;
* a ``TorchFunctionMode`` sees every torch function the forward pass calls. It counts MACs
  (conv, transposed conv, linear, matmul, normalisation) and follows the receptive field of
  every tensor from the input onwards, so branches (ResNet's add, Inception's and
  DenseNet's concatenation) and functional code inside ``forward`` are handled without
  knowing the architecture. Where branches meet, the widest receptive field wins.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cnnlab.errors import CnnlabError
from cnnlab.registry import create_model, list_models, model_info


@dataclass
class LayerRow:
    """One layer call: where it sits, what it produces and what it costs."""

    name: str  # module path, e.g. "layer1.0.conv1"
    type: str  # class name, e.g. "Conv2d"
    output_shape: list[int]  # without the batch dimension
    params: int
    formula: str  # e.g. "3*3*128*64 + 64 = 73,792"; "" without parameters
    macs: int  # for the whole batch
    rf: float | None  # receptive field at the output, in input pixels; None if not spatial
    jump: float | None  # input pixels between neighbouring outputs (effective stride)


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
    receptive_field: float | None  # of the last layer with a spatial output

    def to_dict(self, model_name: str) -> dict[str, Any]:
        """A JSON-serialisable document (the schema of ``cnnlab summary --format json``)."""
        layers = []
        for row in self.layers:
            layer = asdict(row)
            layer["rf"], layer["jump"] = _plain(row.rf), _plain(row.jump)
            layers.append(layer)
        return {
            "model": model_name,
            "input": list(self.input_size),
            "layers": layers,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "total_macs": self.total_macs,
            "receptive_field": _plain(self.receptive_field),
            "weight_mb": round(self.weight_mb, 3),
        }


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
    the larger field; adaptive and global pooling widen the field by the pooled window, so
    after a global pool it spans the whole input.

    Raises the registry's ``InputSizeError`` for inputs below the model's minimum and
    ``CnnlabError`` for any other failure of the forward pass.
    """
    recorder = _Recorder(depth)
    tracker = _FieldTracker(recorder.add_macs)
    recorder.field_of = tracker.field
    handles = recorder.attach(model)
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        x = torch.zeros(batch_size, *input_size, device=device, dtype=_float_dtype(model))
        with torch.no_grad(), tracker:
            tracker.start(x)
            model(x)
    except CnnlabError:
        raise
    except Exception as error:
        raise CnnlabError(_failure_line(model, input_size, error)) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    return _totals(model, tuple(input_size), batch_size, recorder.rows, tracker.total_macs)


def render_summary(summary: Summary, title: str) -> Group:
    """A rich table with one row per layer, followed by the totals."""
    table = Table(title=title, show_lines=False)
    for header in ("Layer", "Type", "Output shape", "Params", "Formula", "MACs", "RF", "Jump"):
        justify = "left" if header in ("Layer", "Type", "Output shape", "Formula") else "right"
        table.add_column(header, justify=justify, no_wrap=header != "Formula")
    for row in summary.layers:
        table.add_row(
            row.name,
            row.type,
            "x".join(map(str, row.output_shape)),
            f"{row.params:,}" if row.params else "-",
            row.formula,
            f"{row.macs:,}" if row.macs else "-",
            _pretty(row.rf),
            _pretty(row.jump),
        )
    rf = "-" if summary.receptive_field is None else f"{_pretty(summary.receptive_field)} px"
    totals = Text(
        f"Parameters:           {summary.total_params:,}\n"
        f"Trainable parameters: {summary.trainable_params:,}\n"
        f"MACs:                 {summary.total_macs:,} ({summary.total_macs / 1e9:.2f} G)\n"
        f"Weight memory:        {summary.weight_mb:,.2f} MB (parameters + buffers)\n"
        f"Receptive field:      {rf}"
    )
    return Group(table, totals)


def model_table_rows() -> list[dict[str, Any]]:
    """One row per registered model: name, family, task, params, MACs, sizes.

    Parameters are counted at the default settings (with as many input channels as the
    natural input has) and MACs at the model's natural input size. Models are built on the
    meta device (no memory, no initialisation) and only rebuilt on the CPU when their
    forward pass needs real data (e.g. box filtering).
    """
    rows = []
    for name in list_models():
        info = model_info(name)
        summary = _summarize_cheaply(name, info.input_size)
        rows.append(
            {
                "name": name,
                "family": info.family,
                "task": info.task,
                "params": summary.total_params,
                "macs": summary.total_macs,
                "input_size": list(info.input_size),
                "min_size": info.min_size,
            }
        )
    return rows


def _summarize_cheaply(name: str, input_size: tuple[int, int, int]) -> Summary:
    channels = input_size[0]
    with torch.device("meta"):
        model = create_model(name, in_channels=channels)
    try:
        return summarize(model, input_size, depth=0, device="meta")
    except CnnlabError:
        return summarize(create_model(name, in_channels=channels), input_size, depth=0)


# --- rows -------------------------------------------------------------------------------


# Containers that hold modules without a forward of their own.
_UNCALLED = (nn.ModuleList, nn.ModuleDict)


@dataclass
class _Frame:
    row: LayerRow | None  # None: a container expanded further
    own_macs: int = 0  # MACs of functions a container calls itself, outside its children


@dataclass
class _Recorder:
    depth: int | None
    rows: list[LayerRow] = field(default_factory=list)
    field_of: Callable[[Tensor], _Field | None] = lambda tensor: None
    _stack: list[_Frame] = field(default_factory=list)

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        levels = {"": 0}
        for name, module in model.named_modules():
            parent = name.rpartition(".")[0]
            if name and isinstance(module, _UNCALLED):
                levels[name] = levels[parent]  # never called: its items count as its parent's
                continue
            level = levels[name] = levels[parent] + 1 if name else 0
            if self.depth is not None and level > self.depth:
                continue  # inside a collapsed container: its row collects these
            is_leaf = next(module.children(), None) is None
            makes_row = is_leaf or level == self.depth
            label = name or type(module).__name__
            handles.append(module.register_forward_pre_hook(self._enter(label, module, makes_row)))
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

    def _enter(self, name: str, module: nn.Module, makes_row: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            row = None
            if makes_row:
                params, formula = _count(module, recurse=True)
                row = LayerRow(name, type(module).__name__, [], params, formula, 0, None, None)
                self.rows.append(row)
            self._stack.append(_Frame(row))

        return hook

    def _leave(self, name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            frame = self._stack.pop()
            row = frame.row
            if row is None:
                # A container's own parameters (e.g. a class token) or its own functional
                # MACs get a row, so rows add up to the totals.
                params, formula = _count(module, recurse=False)
                if not params and not frame.own_macs:
                    return
                row = LayerRow(name, type(module).__name__, [], params, formula, 0, None, None)
                row.macs = frame.own_macs
                self.rows.append(row)
            tensor = next(_tensors(output), None)
            if tensor is None:
                return
            row.output_shape = list(tensor.shape[1:])
            found = self.field_of(tensor)
            if found is not None:
                row.rf, row.jump = found.widest()

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


# --- receptive field and MACs -------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """Receptive field and jump per spatial axis, in input pixels (floats: transposed
    convolutions and upsampling make jumps fractional)."""

    rf: tuple[float, ...]
    jump: tuple[float, ...]

    def widest(self) -> tuple[float, float]:
        axis = max(range(len(self.rf)), key=self.rf.__getitem__)
        return self.rf[axis], self.jump[axis]


def _window(f: _Field, kernel: Any, stride: Any, dilation: Any) -> _Field:
    """Conv or pooling: r_out = r_in + d*(k-1)*j_in, j_out = j_in*s."""
    rank = len(f.rf)
    k, s, d = _ntuple(kernel, rank), _ntuple(stride, rank), _ntuple(dilation, rank)
    rf = tuple(r + di * (ki - 1) * j for r, j, ki, di in zip(f.rf, f.jump, k, d, strict=True))
    return _Field(rf, tuple(j * si for j, si in zip(f.jump, s, strict=True)))


def _transposed_window(f: _Field, kernel: Any, stride: Any, dilation: Any) -> _Field:
    """Transposed conv: j_out = j_in/s, r_out = r_in + d*(k-1)*j_out."""
    rank = len(f.rf)
    k, s, d = _ntuple(kernel, rank), _ntuple(stride, rank), _ntuple(dilation, rank)
    jump = tuple(j / si for j, si in zip(f.jump, s, strict=True))
    rf = tuple(r + di * (ki - 1) * j for r, j, ki, di in zip(f.rf, jump, k, d, strict=True))
    return _Field(rf, jump)


def _ntuple(value: Any, rank: int) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (value,) * rank
    value = tuple(value)
    return value * rank if len(value) == 1 else value


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


# A window rule maps (field of the input, input, output, args, kwargs) to the output field.
WindowRule = Callable[[_Field, Tensor, Tensor, tuple, dict], _Field]


def _conv_rule(f: _Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> _Field:
    kernel = _arg(args, kwargs, 1, "weight").shape[2:]
    stride, dilation = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 5, "dilation", 1)
    return _window(f, kernel, stride, dilation)


def _conv_transpose_rule(f: _Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> _Field:
    kernel = _arg(args, kwargs, 1, "weight").shape[2:]
    stride, dilation = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 7, "dilation", 1)
    return _transposed_window(f, kernel, stride, dilation)


def _pool_rule(kernel_at: int, dilation_at: int | None) -> WindowRule:
    def rule(f: _Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> _Field:
        kernel = _arg(args, kwargs, kernel_at, "kernel_size")
        stride = _arg(args, kwargs, kernel_at + 1, "stride") or kernel  # None or [] -> kernel
        dilation = 1 if dilation_at is None else _arg(args, kwargs, dilation_at, "dilation", 1)
        return _window(f, kernel, stride, dilation)

    return rule


def _adaptive_rule(f: _Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> _Field:
    # Output i pools input[floor(i*n/m) : ceil((i+1)*n/m)]; the widest window is the kernel.
    rank = len(f.rf)
    sizes = zip(x.shape[-rank:], y.shape[-rank:], strict=True)
    kernel, stride = [], []
    for n, m in sizes:
        kernel.append(max(math.ceil((i + 1) * n / m) - (i * n) // m for i in range(m)))
        stride.append(n // m if n % m == 0 else n / m)
    return _window(f, kernel, stride, 1)


def _unshuffle_rule(f: _Field, x: Tensor, y: Tensor, args: tuple, kwargs: dict) -> _Field:
    factor = _arg(args, kwargs, 1, "downscale_factor")
    return _window(f, factor, factor, 1)


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


def _follow(f: _Field, x: Tensor, y: Tensor, name: str, args: tuple) -> _Field:
    """The field of ``y`` from input ``x`` through an op without a window (same rank)."""
    rank = len(f.rf)
    sizes = list(zip(x.shape[-rank:], y.shape[-rank:], strict=True))
    if name in _RESAMPLERS:
        return _Field(f.rf, tuple(j * n / m for j, (n, m) in zip(f.jump, sizes, strict=True)))
    steps = _slice_steps(args[1], x.dim())[-rank:] if name == "__getitem__" else None
    if steps is not None:
        return _Field(f.rf, tuple(j * s for j, s in zip(f.jump, steps, strict=True)))
    # An axis reduced to one value (a mean over H and W) sees the whole axis.
    rf, jump = [], []
    for r, j, (n, m) in zip(f.rf, f.jump, sizes, strict=True):
        whole = m == 1 and n > 1
        rf.append(r + (n - 1) * j if whole else r)
        jump.append(j * n if whole else j)
    return _Field(tuple(rf), tuple(jump))


def _slice_steps(index: Any, ndim: int) -> list[int] | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(isinstance(item, slice) or item is Ellipsis for item in items):
        return None
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1 :]
    items += [slice(None)] * (ndim - len(items))
    return [item.step or 1 for item in items]


def _widest(fields: list[tuple[_Field, tuple[bool, ...]]]) -> _Field:
    """Where branches meet, each axis takes the largest field, and the jump of the widest
    branch that is not broadcast along that axis (a (B, C, 1, 1) gate has no spacing)."""
    rf, jump = [], []
    for axis in range(len(fields[0][0].rf)):
        ranked = sorted(fields, key=lambda pair: pair[0].rf[axis], reverse=True)
        spaced = [f for f, broadcast in ranked if not broadcast[axis]] or [ranked[0][0]]
        rf.append(ranked[0][0].rf[axis])
        jump.append(spaced[0].jump[axis])
    return _Field(tuple(rf), tuple(jump))


def _broadcast(x: Tensor, y: Tensor, rank: int) -> tuple[bool, ...]:
    return tuple(n == 1 < m for n, m in zip(x.shape[-rank:], y.shape[-rank:], strict=True))


# A MAC rule maps (args, kwargs, output) to multiply-accumulates for the whole batch.
MacRule = Callable[[tuple, dict, Any], int]


def _conv_macs(args: tuple, kwargs: dict, out: Any) -> int:
    weight = _arg(args, kwargs, 1, "weight")  # (cout, cin/groups, *kernel)
    return out.numel() * math.prod(weight.shape[1:])


def _conv_transpose_macs(args: tuple, kwargs: dict, out: Any) -> int:
    # Every input element is scattered through a (cout/groups, *kernel) slice of the weight.
    weight = _arg(args, kwargs, 1, "weight")  # (cin, cout/groups, *kernel)
    return args[0].numel() * math.prod(weight.shape[1:])


def _linear_macs(args: tuple, kwargs: dict, out: Any) -> int:
    weight = _arg(args, kwargs, 1, "weight")  # (out, in)
    return args[0].numel() * weight.shape[0]


def _matmul_macs(args: tuple, kwargs: dict, out: Any) -> int:
    return out.numel() * args[0].shape[-1]


def _attention_macs(args: tuple, kwargs: dict, out: Any) -> int:
    query, key, value = args[:3]  # (..., L, E), (..., S, E), (..., S, Ev)
    return math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def _norm_macs(weight_at: int) -> MacRule:
    # torchinfo's convention: batch * (weight + bias elements), not per element.
    def rule(args: tuple, kwargs: dict, out: Any) -> int:
        weight = _arg(args, kwargs, weight_at, "weight")
        bias = _arg(args, kwargs, weight_at + 1, "bias")
        count = sum(t.numel() for t in (weight, bias) if isinstance(t, Tensor))
        return out.shape[0] * count if out.dim() > 1 else count

    return rule


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
    return rules


_MAC_RULES = _mac_rules()


class _FieldTracker(TorchFunctionMode):
    """Sees every torch function of the forward pass: counts MACs and gives each output
    tensor a receptive field derived from its inputs'.

    Tensors are keyed by ``id`` with a weak reference, so a recycled id is never mistaken
    for the tensor that used to have it, and nothing is kept alive longer than the model
    keeps it.
    """

    def __init__(self, add_macs: Callable[[int], None]) -> None:
        super().__init__()
        self._add_macs = add_macs
        self._fields: dict[int, tuple[weakref.ref, _Field]] = {}
        self.total_macs = 0

    def start(self, x: Tensor) -> None:
        if x.dim() >= 3:  # (B, C, *spatial)
            rank = x.dim() - 2
            self._set(x, _Field((1.0,) * rank, (1.0,) * rank))

    def field(self, tensor: Tensor) -> _Field | None:
        entry = self._fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _set(self, tensor: Tensor, f: _Field) -> None:
        self._fields[id(tensor)] = (weakref.ref(tensor), f)

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        count = _MAC_RULES.get(name)
        if count is not None:
            macs = int(count(args, kwargs, out))
            self.total_macs += macs
            self._add_macs(macs)
        self._propagate(name, args, kwargs, out)
        return out

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outputs = list(_tensors(out))
        if not outputs:
            return
        rule = _WINDOW_RULES.get(name)
        if rule is not None:
            x = args[0] if args else kwargs.get("input")
            f = self.field(x) if isinstance(x, Tensor) else None
            if f is not None and outputs[0].dim() == x.dim():
                self._set(outputs[0], rule(f, x, outputs[0], args, kwargs))
            return
        sources = [(t, f) for t in _tensors((args, kwargs)) if (f := self.field(t)) is not None]
        for y in outputs:
            # A change of rank (flatten, a mean without keepdim) ends the spatial field.
            fields = [
                (_follow(f, x, y, name, args), _broadcast(x, y, len(f.rf)))
                for x, f in sources
                if x.dim() == y.dim()
            ]
            if fields:
                self._set(y, _widest(fields))


def _tensors(value: Any) -> Iterator[Tensor]:
    """Tensors inside nested tuples, lists and dicts, in order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


# --- totals and formatting ----------------------------------------------------------------


def _totals(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int,
    rows: list[LayerRow],
    total_macs: int,
) -> Summary:
    params = list(model.parameters())  # shared parameters appear once
    tensors = [*params, *model.buffers()]
    return Summary(
        input_size=input_size,
        batch_size=batch_size,
        layers=rows,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_macs=total_macs,
        weight_mb=sum(t.numel() * t.element_size() for t in tensors) / 1e6,
        receptive_field=next((row.rf for row in reversed(rows) if row.rf is not None), None),
    )


def _float_dtype(model: nn.Module) -> torch.dtype:
    floating = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floating, torch.get_default_dtype())


def _failure_line(model: nn.Module, input_size: tuple[int, ...], error: Exception) -> str:
    name = getattr(model, "model_name", type(model).__name__)
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    return f"{name} failed on input {','.join(map(str, input_size))}: {reason}"


def _plain(value: float | None) -> int | float | None:
    """An int when whole, else a float rounded for JSON."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, 4)


def _pretty(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")
