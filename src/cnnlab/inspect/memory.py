"""The memory of a training step, estimated by running it where it allocates nothing.

``estimate_memory(model, input_size, batch)`` copies the model to the meta device and runs
a training step there (forward, loss, backward, optimiser step) in the steady state of
every step after the first, where the optimiser's state already exists. ``StorageTracker``
sees every aten operation and keeps the bytes of the distinct storages alive after it, so
the peak is the largest sum of live storages: weights, gradients, optimiser state, what
autograd saved for backward, and the transient buffers (the gradient flowing back through
each layer, the optimiser's temporaries). ``torch.autograd.graph.saved_tensors_hooks`` says which
storages autograd keeps for backward and in which layer they were saved.

What runs inside one kernel allocates where no operation sees it (oneDNN's primitives and
scratch buffers, the allocator's slack); ``RUNTIME_OVERHEAD`` adds what measuring real
steps on the CPU showed it to be (docs/flops_and_memory.md has the table).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cnnlab.errors import CnnlabError

OPTIMIZERS = ("adamw", "adam", "sgd")
# What the estimate cannot see, as measured on the CPU (docs/flops_and_memory.md): a fixed
# part (oneDNN's primitive cache, the allocator's slack) and a part per convolution call
# (oneDNN's scratch buffers and the code it generates for each shape).
RUNTIME_OVERHEAD = 2_000_000
OVERHEAD_PER_CONV = 100_000
MEMORY_LEGEND = (
    "memory: activations = distinct storages autograd keeps for backward; training step ="
    " peak of live weights + gradients + optimiser state + activations + transients, a"
    " steady step simulated on the meta device, plus measured runtime overhead"
)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``8GB`` -> 8e9 bytes (also kB, MB, TB, KiB, MiB, GiB, a bare number of bytes)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else ""
    if not found or unit not in _UNITS or float(found.group(1)) <= 0:
        raise CnnlabError(f"--max-memory {text!r}: expected a size such as 8GB, 512MB or 16GiB")
    return int(float(found.group(1)) * _UNITS[unit])


@dataclass
class MemoryEstimate:
    """Bytes of one training step at ``batch_size``; ``activation_by_layer`` holds, per
    module call in order, (module name, bytes saved by its own code, bytes saved while it
    or its children ran)."""

    batch_size: int
    optimizer: str
    weights: int  # parameters and buffers
    gradients: int
    optimizer_state: int  # AdamW/Adam: two moments per parameter; SGD: one momentum
    activations: int  # distinct storages autograd keeps for backward (the input included)
    activation_by_dtype: dict[str, int]
    largest_transient: int  # the largest buffer that is none of the above
    step_peak: int  # the simulated peak, all of these alive together
    backward_peak: int  # the largest part of it during forward and backward (grows with batch)
    optimizer_peak: int  # during the optimiser step (no activations left: batch-free)
    overhead: int  # RUNTIME_OVERHEAD and OVERHEAD_PER_CONV, measured
    activation_by_layer: list[tuple[str, int, int]] = field(default_factory=list, repr=False)

    @property
    def training_step(self) -> int:
        """The estimated peak of a training step: the simulated peak and the overhead."""
        return self.step_peak + self.overhead

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        del document["activation_by_layer"]
        document["training_step"] = self.training_step
        return document


class StorageTracker(TorchDispatchMode):
    """The peak of the bytes of live storages, across every aten operation it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.held: set[int] = set()
        self.current = self.peak = 0
        self.sizes: dict[int, int] = {}  # every storage seen since ``reset_peak``
        self._ops = 0

    def add(self, tensor: Tensor, held: bool = False) -> None:
        """Count ``tensor``'s storage while it lives; ``held``: for the whole step (weights,
        optimiser state), never looked at again."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.held:
            return
        if held:
            self.held.add(key)
        else:
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.sizes[key] = storage.nbytes()
        self.current += storage.nbytes()

    def reset_peak(self, forget_sizes: bool = True) -> None:
        """Start a new peak from what is alive now (and a new list of sizes)."""
        self._sweep()
        self.peak = self.current
        if forget_sizes:
            self.sizes = {}

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.add(tensor)
        self._ops += 1
        # What was freed only lowers the sum: look for it only when a new peak is possible
        # (and now and then, to keep the table short).
        if self.current > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.current)
        elif self._ops % 256 == 0:
            self._sweep()
        return out


def training_loss(output: Any) -> Tensor:
    """The loss of a step on zero targets: cross-entropy over dimension 1 of a (N, C, ...)
    output (classification, segmentation), else the mean of every output tensor."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]
    if len(tensors) == 1 and tensors[0].dim() >= 2:
        logits = tensors[0]
        target = torch.zeros(
            (logits.shape[0], *logits.shape[2:]), dtype=torch.long, device=logits.device
        )
        return nn.functional.cross_entropy(logits, target)
    return sum(t.float().mean() for t in tensors)


def make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``name`` (``OPTIMIZERS``) at cnnlab's training defaults; SGD with momentum 0.9."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    raise CnnlabError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")


def estimate_memory(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int = 1,
    optimizer: str = "adamw",
    dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """Run a steady training step of ``model`` on a meta copy and measure their live bytes (see
    the module doc). The model itself is left as it was."""
    if batch_size < 1:
        raise CnnlabError(f"--batch {batch_size}: expected a batch size of at least 1")
    meta = _meta_copy(model)
    params = [p for p in meta.parameters() if p.requires_grad]
    dtype = dtype or next((p.dtype for p in meta.parameters()), torch.get_default_dtype())
    x = torch.zeros(batch_size, *input_size, device="meta", dtype=dtype)
    opt = make_optimizer(optimizer, params)
    tracker = StorageTracker()
    meta.train()
    try:
        state = _steady_state(opt)
        for tensor in (*meta.parameters(), *meta.buffers(), *state, x):
            tracker.add(tensor, held=True)
        tracker.reset_peak()
        saved = _SavedTensors(meta)
        with tracker:  # the second, steady step: every operation watched
            _step(meta, x, opt, saved, tracker)
    except CnnlabError:
        raise
    except Exception as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise CnnlabError(f"the training step failed on the meta device: {reason}") from error
    weights = _bytes([*meta.parameters(), *meta.buffers()])
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
    known = {t.untyped_storage()._cdata for t in [*meta.parameters(), *meta.buffers(), *state]}
    known |= saved.storages | saved.grad_storages
    transients = [n for key, n in tracker.sizes.items() if key not in known]
    return MemoryEstimate(
        batch_size=batch_size,
        optimizer=optimizer,
        weights=weights,
        gradients=saved.grad_bytes,
        optimizer_state=_bytes(state),
        activations=sum(saved.by_dtype.values()),
        activation_by_dtype=dict(saved.by_dtype),
        largest_transient=max(transients, default=0),
        step_peak=max(saved.backward_peak, tracker.peak),
        backward_peak=saved.backward_peak,
        optimizer_peak=tracker.peak,
        overhead=RUNTIME_OVERHEAD + OVERHEAD_PER_CONV * saved.convolutions,
        activation_by_layer=saved.by_call,
    )


def max_batch_size(
    estimate_at: Callable[[int], MemoryEstimate], limit: int, largest: int = 1 << 20
) -> tuple[int, MemoryEstimate | None]:
    """The largest batch whose estimated training step fits in ``limit`` bytes (0 when
    not even one sample does), and its estimate.

    The optimiser step's peak does not depend on the batch and the backward peak grows
    linearly with it: two simulations (batch 1 and 2) give both lines, a binary search over
    them finds the batch, and a simulation there checks it (stepping down if it is over).
    """
    one, two = estimate_at(1), estimate_at(2)
    per_sample = max(two.backward_peak - one.backward_peak, 1)

    def fits(batch: int) -> bool:
        backward = one.backward_peak + per_sample * (batch - 1)
        return max(backward, one.optimizer_peak) + one.overhead <= limit

    if one.training_step > limit:
        return 0, None
    low, high = 1, largest
    while low < high:  # the largest batch that fits
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    found = estimate_at(low) if low > 2 else (one if low == 1 else two)
    while found.training_step > limit and low > 1:
        low = max(1, int(low * limit / found.training_step))
        found = estimate_at(low)
    return low, found


def memory_document(memory: MemoryEstimate, train: bool) -> dict[str, Any]:
    """The keys a summary's JSON gains: the batch, the activations (total and by dtype)
    and, with ``train``, the whole training step (``MemoryEstimate.to_dict``)."""
    document: dict[str, Any] = {
        "batch": memory.batch_size,
        "activation_bytes": memory.activations,
        "activation_by_dtype": dict(memory.activation_by_dtype),
    }
    if train:
        document["training_step"] = memory.to_dict()
    return document


def activations_per_row(names: list[str], memory: MemoryEstimate) -> list[int]:
    """The activation bytes of each summary row, by its module path (the k-th row of a name
    takes its k-th call): what it and its children saved, or only its own where other rows
    hold its children; a path with no call (the root's row is its class name) gets 0."""
    calls: dict[str, list[tuple[int, int]]] = {}
    for name, own, total in memory.activation_by_layer:
        calls.setdefault(name, []).append((own, total))
    if len(names) == 1 and names[0] not in calls:  # the model is one layer: its class name
        names = [""]
    taken: Counter[str] = Counter()
    found = []
    for name in names:
        index, taken[name] = taken[name], taken[name] + 1
        own, total = (calls.get(name) or [(0, 0)])[min(index, len(calls.get(name, [0])) - 1)]
        parent = any(other.startswith(f"{name}.") for other in names)
        found.append(own if parent else total)
    return found


def _steady_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The state the optimiser has from its second step on, made as its first step makes
    it (torch.optim's ``_init_group``): Adam(W) a step count and two moments per
    parameter, SGD with momentum one buffer. Simulating that first step would double the
    time of an estimate."""
    for group in opt.param_groups:
        for p in group["params"]:
            if isinstance(opt, torch.optim.SGD):
                opt.state[p] = {"momentum_buffer": torch.zeros_like(p)}
            else:
                opt.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
    return [t for s in opt.state.values() for t in s.values()]


def _step(
    model: nn.Module,
    x: Tensor,
    opt: torch.optim.Optimizer,
    saved: _SavedTensors | None = None,
    tracker: StorageTracker | None = None,
) -> None:
    if saved is None:
        loss = training_loss(model(x))
    else:
        with saved:
            loss = training_loss(model(x))
        saved.stop()
    loss.backward()
    if saved is not None and tracker is not None:
        saved.after_backward(model, tracker)
    opt.step()
    opt.zero_grad(set_to_none=True)


class _SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """What autograd saves for backward during one forward pass: the distinct storages
    (parameters and buffers left out: they are the weights), by dtype and by the module
    call that saved them (each enclosing module call counts them too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(self._pack, lambda tensor: tensor)
        self.weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self.storages: set[int] = set()
        self.by_dtype: Counter[str] = Counter()
        self.by_call: list[tuple[str, int, int]] = []
        self.grad_storages: set[int] = set()
        self.grad_bytes = self.backward_peak = 0
        self.convolutions = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        self._stack: list[int] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            self._stack.append(len(self.by_call))
            self.by_call.append((name, 0, 0))

        return hook

    def _leave(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._stack.pop()

    def _pack(self, tensor: Tensor) -> Tensor:
        key = tensor.untyped_storage()._cdata
        if key in self.weights or key in self.storages:
            return tensor
        self.storages.add(key)
        size = tensor.untyped_storage().nbytes()
        self.by_dtype[str(tensor.dtype).removeprefix("torch.")] += size
        for index in self._stack:
            name, own, total = self.by_call[index]
            own += size if index == self._stack[-1] else 0
            self.by_call[index] = (name, own, total + size)
        return tensor

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()

    def after_backward(self, model: nn.Module, tracker: StorageTracker) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_storages = {g.untyped_storage()._cdata for g in grads}
        self.grad_bytes = _bytes(grads)
        self.backward_peak = tracker.peak
        tracker.reset_peak(forget_sizes=False)  # from here on: the optimiser step's own peak


def _bytes(tensors: list[Tensor]) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _meta_copy(model: nn.Module) -> nn.Module:
    """The model with its parameters and buffers on the meta device (a copy, unless it is
    there already); training flags are per copy."""
    return copy.deepcopy(model).to("meta")
