"""Several processes, one model: DistributedDataParallel when launched by torchrun.

``torchrun --nproc_per_node N -m cnnlab train ...`` starts N copies of the command with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; ``session``
joins them into a process group (gloo on CPU, nccl on CUDA). Each process trains on its own
shard of every epoch (a DistributedSampler), gradients are averaged by DDP, and the main
process (rank 0) alone evaluates, writes the run folder and prints. A plain ``cnnlab train``
is a group of one, and every function here is then a no-op.

``torchrun --max-restarts N`` (elastic) starts the worker group again after a worker dies;
``torchrun_job`` and ``restarts`` tell ``cnnlab.engine.loop.train`` that the run folder it
finds is the one this job was writing, so the group resumes it (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
# A gloo group beside an nccl one, for votes on the CPU (``any_across``).
_cpu_votes: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class Context:
    """Where this process stands in the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine: its GPU

    @property
    def main(self) -> bool:
        """The one process that evaluates, writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """This process's place in the current process group (a group of one when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Context(dist.get_rank(), dist.get_world_size(), local)


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_job() -> str | None:
    """The id of the torchrun job that started this process as one of several (its
    rendezvous id: ``--rdzv-id``, a fresh one per ``--standalone`` launch, ``none`` for the
    static rendezvous of ``--master-addr``), kept by every restart of its worker group;
    None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if launched() else None


def restarts() -> int:
    """How many times this machine's torchrun agent restarted its workers after one failed.
    Only the failed machine counts it: a machine whose workers were stopped because another
    one's failed starts them again with its count unchanged."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def is_main_process() -> bool:
    """Whether this process is the one that prints: rank 0 of a torchrun launch, or the
    only process (also after the group is gone, unlike ``context().main``)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def session(device_type: str) -> Iterator[Context]:
    """Join the group torchrun describes (``env://``) for the block, then leave it.

    Nothing happens when the process was not launched as one of several, or when the caller
    already set up a group (it then stays the caller's to destroy). Other ranks log errors
    only, so a warning is printed once, by the main process.
    """
    global _cpu_votes
    if not launched() or dist.is_initialized():
        yield context()
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # before init: NCCL binds each rank to its GPU
    dist.init_process_group(backend)
    ctx = context()
    logger = logging.getLogger("cnnlab")
    level = logger.level
    if not ctx.main:
        logger.setLevel(logging.ERROR)
    try:
        yield ctx
    finally:
        logger.setLevel(level)
        dist.destroy_process_group()
        _cpu_votes = None


def local_device(device: torch.device, ctx: Context) -> torch.device:
    """Each process drives the GPU of its local rank; CPU processes share the CPU."""
    if device.type == "cuda" and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return device


def wrap(model: nn.Module, device: torch.device, ctx: Context) -> nn.Module:
    """``model`` in DistributedDataParallel when the group has several processes (the
    wrapper shares its parameters, so ``model`` stays the one to save and evaluate)."""
    if not ctx.active:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sum_across(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 0-dim tensor summed over all processes (one all_reduce for all of them)."""
    if not context().active:
        return values
    packed = torch.stack([v.double() for v in values])  # (len(values),)
    dist.all_reduce(packed)
    return tuple(p.to(v.dtype) for p, v in zip(packed, values, strict=True))


def any_across(flag: bool) -> Callable[[], bool]:
    """Start a vote of every process on whether ``flag`` is true on any of them; returns
    the function that waits for the answer, so the vote travels while the caller works.
    One all_reduce of one number, on the CPU (with nccl, in a gloo group made at the
    first vote): a vote at every step costs no wait for the device. Every process must
    vote at the same points."""
    if not context().active:
        return lambda: flag
    global _cpu_votes
    if dist.get_backend() != "gloo" and _cpu_votes is None:
        _cpu_votes = dist.new_group(backend="gloo")  # every process votes at the same point
    vote = torch.tensor([int(flag)], dtype=torch.int32)
    work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_cpu_votes, async_op=True)

    def answer() -> bool:
        work.wait()
        return bool(vote.item())

    return answer


def from_main(obj: T) -> T:
    """The main process's ``obj`` on every process (other processes pass anything, e.g.
    None, and wait here while the main one works)."""
    if not context().active:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
