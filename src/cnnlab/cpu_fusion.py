"""A folded model's convolutions as fused oneDNN calls for CPU inference: what ``Run.predict``
and ``Run.evaluate`` run on the CPU (``cnnlab.runs``).

``fuse_for_cpu(model)`` traces the model (torch.fx) and replaces each ``Conv2d`` with a
``PackedConv2d`` that takes over what follows it: a ReLU (``conv+relu`` in one call) or a
residual add and the ReLU after it (a ResNet block's second convolution, ``conv+add+relu``),
so a BasicBlock is two oneDNN calls instead of five ops. Each one convolves with its weights
reordered once into oneDNN's blocked layout for the input shape it sees
(``torch.ops.mkldnn._reorder_convolution_weight`` and ``_convolution_pointwise``, what
inductor's freezing does), kept for the last ``PACKED_SHAPES`` shapes: a layout chosen for one
batch size is slower at another (benchmarks/README.md, "predict"), so every shape gets its
own, packed on its first call. Eager torch reorders the weights on every call instead.
The layout of the batch is left as it comes (channels_last from a task that trains so):
measured in CPU time, packed convolutions took the same time from NCHW.

The answers are the model's (the same oneDNN convolution, float rounding aside). Anything the
fast path does not cover runs as plain torch ops: a call with autograd on (explanations need
gradients), another device or dtype, a residual whose shape does not match, or a shape whose
packing fails. The original model is not changed; the fused one shares its weights, but
packs a copy of them on first use: after changing the weights, fuse the model again.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

PACKED_SHAPES = 4  # input shapes whose packed weights each convolution keeps (a full batch,
# the last smaller one, a single image, ...)
_MISSING = object()
_RELUS = {F.relu, torch.relu}
_ADDS = {operator.add, operator.iadd, torch.add}
# Modules whose output is a tensor of its own (never a view of another), so a fused add may
# write the convolution's result into it once nothing else needs it (with PackedConv2d).
_FRESH_OUTPUTS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class PackedConv2d(nn.Module):
    """A Conv2d, optionally followed by ``+ residual`` and/or a ReLU, as one oneDNN call.

    ``forward(x)`` or, with ``add``, ``forward(x, residual)``. With ``in_place`` the sum is
    written into ``residual`` (oneDNN's sum post-op, no new buffer): the graph guarantees
    that nothing reads it afterwards.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool, add: bool, in_place: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # shared with the original model
        self.padding = list(conv.padding)
        self.stride, self.dilation = list(conv.stride), list(conv.dilation)
        self.groups = conv.groups
        self.relu, self.add, self.in_place = relu, add, in_place
        self.packed: dict[tuple[int, ...], Tensor | None] = {}  # by input shape

    def extra_repr(self) -> str:
        fused = "+".join(["conv", *(["add"] if self.add else []), *(["relu"] if self.relu else [])])
        return f"{fused}, weight {tuple(self.weight.shape)}, stride {tuple(self.stride)}"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        weight = self._packed_for(x, residual) if self._fast(x) else None
        if weight is None:
            return self._plain(x, residual)
        args = (weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, *args, "relu" if self.relu else "none", [], ""
            )
        unary = "relu" if self.relu else None
        if self.in_place:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, *args, "add", None, unary, [], ""
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, *args, "add", None, unary, [], ""
        )

    def _fast(self, x: Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.dim() == 4
        )

    def _packed_for(self, x: Tensor, residual: Tensor | None) -> Tensor | None:
        """The weights packed for ``x``'s shape (None: this shape takes the plain path)."""
        if residual is not None and (
            residual.dtype != torch.float32 or tuple(residual.shape) != self._output_shape(x)
        ):
            return None
        key = tuple(x.shape)
        # A plain dict, read and written in single calls, oldest shape out first: threads
        # predicting at once (``cnnlab serve``) can at worst pack a shape twice.
        packed = self.packed.get(key, _MISSING)
        if packed is not _MISSING:
            return packed
        try:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, key
            )
        except RuntimeError:  # a shape oneDNN does not take: plain torch for it, every time
            packed = None
        self.packed[key] = packed
        for oldest in list(self.packed)[:-PACKED_SHAPES]:  # (list(): one call, one snapshot)
            self.packed.pop(oldest, None)
        return packed

    def _output_shape(self, x: Tensor) -> tuple[int, ...]:
        size = [
            (length + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for length, pad, dilation, kernel, stride in zip(
                x.shape[2:],
                self.padding,
                self.dilation,
                self.weight.shape[2:],
                self.stride,
                strict=True,
            )
        ]
        return (x.shape[0], self.weight.shape[0], *size)

    def _plain(self, x: Tensor, residual: Tensor | None) -> Tensor:
        settings = (self.stride, self.padding, self.dilation, self.groups)
        y = F.conv2d(x, self.weight, self.bias, *settings)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


def fuse_for_cpu(model: nn.Module) -> nn.Module | None:
    """``model`` (eval mode, BatchNorm folded) with its Conv2d layers fused and packed as
    ``PackedConv2d``; None when fx cannot trace it, oneDNN is missing, or it has no Conv2d
    to fuse. The model itself is left unchanged."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow: not every forward can be traced
        return None
    graph = graph_module.graph
    for node in list(graph.nodes):  # the folded BatchNorms
        if node.op == "call_module" and type(_module(graph_module, node)) is nn.Identity:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    fused = 0
    for node in list(graph.nodes):
        conv = _module(graph_module, node) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or not _packable(conv) or node.kwargs:
            continue
        relu, residual, last = _followers(graph_module, node)
        in_place = residual is not None and _free_after(residual, last, graph_module)
        name = f"fused_conv{fused}"
        graph_module.add_submodule(name, PackedConv2d(conv, relu, residual is not None, in_place))
        with graph.inserting_before(last):  # the residual may be computed after the conv
            arguments = (node.args[0],) if residual is None else (node.args[0], residual)
            replacement = graph.call_module(name, arguments)
        last.replace_all_uses_with(replacement)
        while last is not node:  # the ReLU, the add, back to the conv: one user each
            previous = next(
                arg for arg in last.args if isinstance(arg, fx.Node) and arg is not residual
            )
            graph.erase_node(last)
            last = previous
        graph.erase_node(node)
        fused += 1
    if not fused:
        return None
    # What callers read off the model besides calling it (its name, min_input_size,
    # fixed_input_size, feature_info) holds for the fused one too.
    for name, value in vars(model).items():
        if not name.startswith("_") and not hasattr(graph_module, name):
            setattr(graph_module, name, value)
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module.eval()


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module:
    return graph_module.get_submodule(str(node.target))


def _packable(conv: nn.Conv2d) -> bool:
    return (
        conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
    )


def _is_relu(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(_module(graph_module, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _followers(graph_module: fx.GraphModule, conv: fx.Node) -> tuple[bool, fx.Node | None, fx.Node]:
    """What the conv at ``conv`` can take over: (relu, residual, the last node it replaces).
    Each step must be the only user of the one before, or its value is needed on its own."""
    (user,) = conv.users if len(conv.users) == 1 else (None,)
    if user is None:
        return False, None, conv
    if _is_relu(graph_module, user):
        return True, None, user
    is_add = user.op == "call_function" and user.target in _ADDS
    if not is_add or len(user.args) != 2 or user.kwargs:
        return False, None, conv
    residual = user.args[1] if user.args[0] is conv else user.args[0]
    if not isinstance(residual, fx.Node) or residual is conv:
        return False, None, conv
    (after,) = user.users if len(user.users) == 1 else (None,)
    if after is not None and _is_relu(graph_module, after):
        return True, residual, after
    return False, residual, user


def _free_after(residual: fx.Node, last: fx.Node, graph_module: fx.GraphModule) -> bool:
    """Whether the fused call may overwrite ``residual``: a tensor of its own (a
    convolution's or a pooling's output, never the model's input or a view), read by no
    node after ``last``."""
    if residual.op != "call_module":
        return False
    if not isinstance(_module(graph_module, residual), (PackedConv2d, *_FRESH_OUTPUTS)):
        return False
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    return all(order[user] <= order[last] for user in residual.users)
