"""torch.compile (inductor) with a way back: a model that inductor cannot compile runs as it
was, with one line saying why, so compiling never turns a working run into a failing one.

``compile_model`` compiles and runs one example at once, because inductor compiles lazily
on the first call: the time it reports is what a user waits before the first image, and a
model that fails to compile fails here, where the fallback can catch it. For training
(``grad=True``) the example also goes backward, which compiles the backward graph; the
model's buffers (BatchNorm's running statistics), its gradients and the random number
generators are as they were before, so the trial changes nothing a run computes.

``auto`` (the default of ``--compile``) compiles where the time a run saves outweighs the
compile time: run steps x (eager - compiled step) > compile seconds. Measured on this
project's CPU (benchmarks/compile.py, docs/speed.md) the compiled training step saved
nothing (1.00x eager on the demo's ConvNet, 0.93x on ResNet-18) and prediction at most 7%
at batch 16 on ResNet-18, paid back after thousands of images: no run's steps and no
command's images make up for a saving of zero, so ``auto`` compiles nothing on a CPU, and
on a GPU, where nothing was measured, nothing either. ``on`` always tries.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnnlab.config import COMPILE_SETTINGS

__all__ = [
    "COMPILE_SETTINGS",
    "Compiled",
    "CompiledOnFirstCall",
    "compile_model",
    "one_line",
]


@dataclass
class Compiled:
    """The model to run (compiled, or the original when compiling failed)."""

    model: nn.Module
    compiled: bool
    seconds: float  # compiling and the first call
    reason: str | None = None  # why it fell back, one line


def compile_model(
    model: nn.Module,
    example: Tensor,
    *,
    grad: bool = False,
    mode: str | None = None,
    dynamic: bool | None = None,
) -> Compiled:
    """``torch.compile(model)`` run once on ``example`` (without autograd unless ``grad``:
    then forward and backward, in the model's current train/eval state); on any failure the
    original ``model`` with the reason. ``mode`` and ``dynamic`` are torch.compile's (None:
    its defaults; ``dynamic=True`` compiles one graph for every batch size)."""
    start = time.perf_counter()
    # Building its C++ kernels, torch warns that it found no CUDA; a CPU user needs none.
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        if example.device.type == "cpu":
            require_cpp_compiler()
        compiled = torch.compile(model, backend="inductor", mode=mode, dynamic=dynamic)
        if grad:
            _trial_step(model, compiled, example)
        else:
            with torch.inference_mode():  # as every task predicts: one graph, no recompile
                compiled(example)
    except Exception as error:  # inductor fails in many ways (no compiler, an op it lacks)
        return Compiled(model, False, time.perf_counter() - start, one_line(error))
    finally:
        extension_log.setLevel(level)
    return Compiled(compiled, True, time.perf_counter() - start)


def require_cpp_compiler() -> None:
    """Raise inductor's own InvalidCxxCompiler at once when it finds no C++ compiler (CXX,
    else g++), which it needs for every CPU kernel: without this, a machine with no
    compiler fails the same way only after tracing and lowering the whole model (10-20 s
    for a small one). Where torch has moved that search, inductor finds out itself."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    get_cpp_compiler()


def one_line(error: BaseException) -> str:
    """``error`` as one short line: its type and the first line of its message."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def _trial_step(model: nn.Module, compiled: nn.Module, example: Tensor) -> None:
    """Forward and backward through ``compiled`` once, leaving ``model``'s buffers, its
    gradients and the random generators as they were."""
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    devices = [example.device] if example.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=example.device.type):
        try:
            total = _sum_of(compiled(example))
            if total.requires_grad:
                total.backward()
        finally:
            with torch.no_grad():
                for name, value in model.named_buffers():
                    value.copy_(buffers[name])
            for name, param in model.named_parameters():
                param.grad = grads[name]


def _sum_of(output: Any) -> Tensor:
    """The sum of every floating-point tensor in a model's output (a tensor, or tuples,
    lists and dicts of them): one scalar to go backward from."""
    if isinstance(output, Tensor):
        return output.float().sum() if output.is_floating_point() else torch.zeros(())
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return sum((_sum_of(item) for item in output), torch.zeros(()))
    return torch.zeros(())


class CompiledOnFirstCall(nn.Module):
    """``module`` for inference, compiled on its first call for the shape of that batch.

    Batches of that shape run compiled; others (a command's smaller last batch) run
    ``module`` itself, as each new shape would cost a compile again (tens of seconds on a
    CPU). A model that fails to compile runs eagerly, with one line on stderr saying why.
    ``module``'s weights are its own: ``state_dict`` has the keys of ``module``.
    """

    def __init__(self, module: nn.Module, mode: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.mode = mode
        # Kept out of the module tree (it wraps ``module``, whose weights are listed once).
        object.__setattr__(self, "compiled", None)
        self.shape: tuple[int, ...] | None = None
        self.reason: str | None = None  # why compiling fell back, once it did
        self.seconds = 0.0

    def forward(self, images: Tensor) -> Any:
        if self.shape is None:
            self.shape = tuple(images.shape)
            result = compile_model(self.module, images, mode=self.mode)
            self.seconds, self.reason = result.seconds, result.reason
            if result.compiled:
                object.__setattr__(self, "compiled", result.model)
                print(
                    f"compile: the model compiled for batches of {self.shape[0]} in"
                    f" {result.seconds:.1f} s",
                    file=sys.stderr,
                )
            else:
                print(f"compile: fell back to eager: {result.reason}", file=sys.stderr)
        if self.compiled is not None and tuple(images.shape) == self.shape:
            return self.compiled(images)
        return self.module(images)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)
