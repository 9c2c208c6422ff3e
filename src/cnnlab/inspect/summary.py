"""Per-layer summary of any ``nn.Module``: output shape, parameters and their formula, MACs,
FLOPs, receptive field and jump (and, with ``with_memory``, the memory of a training step).

Two mechanisms cooperate during one forward pass: module hooks (``rows.py``) record one row
per layer call, in execution order, and ``FieldTracker`` (``tracker.py``) sees every torch
function the forward pass calls, counting MACs and following the receptive field of every
tensor (``receptive_field.py``), so branches and functional code inside ``forward`` are
handled without knowing the architecture. ``FlopCounter`` (``flops.py``) sees the aten
operations below them, counts their FLOPs and lists those it cannot count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.inspect.flops import FlopCounter
from cnnlab.inspect.memory import MemoryEstimate, activations_per_row, memory_document
from cnnlab.inspect.receptive_field import FeatureField, feature_field
from cnnlab.inspect.rows import LayerRow, Recorder
from cnnlab.inspect.tracker import FieldTracker, tensors_in
from cnnlab.models.factory import create_model, model_info
from cnnlab.registry import check_input_size


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
    recorder = Recorder(depth)
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
        raise CnnlabError(recorder.failure_line(model, input_size, error)) from error
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


def plain(value: float | None) -> int | float | None:
    """An int when whole, else a float rounded for JSON."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, 4)
