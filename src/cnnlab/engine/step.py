"""One optimizer step (``Step``) and one pass over the training batches
(``train_epoch``): the inner loop ``fit`` runs for every task, and what lr-find and the
train_step benchmark time."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnlab.compiling import compile_model
from cnnlab.engine.progress import Reporter
from cnnlab.engine.task import TrainingTask


@dataclass
class Step:
    """One optimizer step on one batch, with everything it needs."""

    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float | None
    memory_format: torch.memory_format = torch.preserve_format
    ema: nn.Module | None = None  # an AveragedModel updated after every step
    # The model compiled (cnnlab.compiling) for batches of ``compiled_shape``: other batches
    # (the loader's smaller last one) run eagerly, as a new shape would compile again.
    compiled: nn.Module | None = None
    compiled_shape: tuple[int, ...] = ()

    def __call__(self, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, tuple | None]:
        """Forward, backward, step; returns (loss, the task's batch score) on the device."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = to_device(targets, self.device)
        enabled = self.amp_dtype is not None
        net = self.net
        if self.compiled is not None and tuple(images.shape) == self.compiled_shape:
            net = self.compiled
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            loss, score = self.task.forward_loss(net, images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        return loss, score


def compile_step(
    step: Step,
    setting: str,
    batches: Iterable[tuple[torch.Tensor, Any]],
    processes: int,
    say: Callable[[str], None],
    main: bool = True,
) -> None:
    """Give ``step`` the model compiled for training (``step.compiled``) when ``setting``
    is ``on``. ``auto`` would compile where the run's steps x the step time saved outweigh
    the compile time; measured, a compiled training step saved nothing on a CPU
    (``cnnlab.compiling``, docs/speed.md), so it stays eager whatever the run. The first
    of ``batches`` is the example it compiles for. A model that fails to compile trains
    eagerly, with one line on stderr saying why; under torchrun (``processes`` > 1)
    nothing is compiled."""
    if setting != "on":
        return
    if processes > 1:
        # DistributedDataParallel's gradient hooks with a compiled module need torch's
        # compiled-DDP settings (and a bucket per graph): not measured here, so not risked.
        if main:
            print(
                "compile: off under torchrun (DistributedDataParallel): training eagerly",
                file=sys.stderr,
            )
        return
    net = step.net
    images, _ = next(iter(batches))
    images = images.to(step.device, memory_format=step.memory_format)
    with torch.autocast(step.device.type, dtype=step.amp_dtype, enabled=step.amp_dtype is not None):
        result = compile_model(net, images, grad=True)
    if not result.compiled:
        if main:
            print(f"compile: fell back to eager: {result.reason}", file=sys.stderr)
        return
    step.compiled, step.compiled_shape = result.model, tuple(images.shape)
    say(f"compile: the model compiled for training in {result.seconds:.1f} s")


def to_device(targets: Any, device: torch.device) -> Any:
    """Every tensor in ``targets`` (a tensor, or lists and dicts of them) on ``device``."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    if isinstance(targets, dict):
        return {key: to_device(value, device) for key, value in targets.items()}
    if isinstance(targets, list | tuple):
        return type(targets)(to_device(value, device) for value in targets)
    return targets


def train_epoch(
    step: Step,
    batches: Iterable[tuple[torch.Tensor, Any]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    say: Reporter,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One pass over ``batches`` (``scheduler`` stepped after each step when given).

    Returns (images seen, summed loss, right answers, scored answers, learning rate of the
    last step); the sums stay on the device, so there is no host sync per step.
    """
    device = step.device
    loss_sum = torch.zeros((), device=device)
    right = torch.zeros((), dtype=torch.long, device=device)
    scored = torch.zeros((), dtype=torch.long, device=device)
    seen, lr = 0, step.optimizer.param_groups[0]["lr"]
    for images, targets in batches:  # (B, C, S, S), the task's targets for B images
        if len(images) == 0:  # every image of the batch was unreadable
            continue
        lr = step.optimizer.param_groups[0]["lr"]
        loss, batch_score = step(images, targets)
        if scheduler is not None:
            scheduler.step()
        seen += len(images)
        loss_sum += loss.detach() * len(images)
        if batch_score is not None:
            right += batch_score[0]
            scored += batch_score[1]
        say.step(seen, loss_sum, right, scored)
    return seen, loss_sum, right, scored, lr
