"""torch.compile (inductor) with a way back: a model that inductor cannot compile runs as it
was, with one line saying why, so compiling never turns a working run into a failing one.

``compile_model`` compiles and runs one example at once, because inductor compiles lazily
on the first call: the time it reports is what a user waits before the first image, and a
model that fails to compile fails here, where the fallback can catch it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

COMPILE_SETTINGS = ("auto", "on", "off")


@dataclass
class Compiled:
    """The model to run (compiled, or the original when compiling failed)."""

    model: nn.Module
    compiled: bool
    seconds: float  # compiling and the first call
    reason: str | None = None  # why it fell back, one line


def compile_model(model: nn.Module, example: Tensor, *, grad: bool = False) -> Compiled:
    """``torch.compile(model)`` run once on ``example`` (without autograd unless ``grad``);
    on any failure the original ``model`` with the reason."""
    start = time.perf_counter()
    try:
        compiled = torch.compile(model, backend="inductor")
        with torch.set_grad_enabled(grad):
            compiled(example)
    except Exception as error:  # inductor fails in many ways (no compiler, an op it lacks)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = f"{type(error).__name__}: {first_line[:200]}"
        return Compiled(model, False, time.perf_counter() - start, reason)
    return Compiled(compiled, True, time.perf_counter() - start)
