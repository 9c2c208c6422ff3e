"""One optimizer step (``Step``) and one pass over the training batches
(``train_epoch``): the inner loop ``fit`` runs for every task, and what lr-find and the
train_step benchmark time."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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

    def __call__(self, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, tuple | None]:
        """Forward, backward, step; returns (loss, the task's batch score) on the device."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = to_device(targets, self.device)
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            loss, score = self.task.forward_loss(self.net, images, targets)
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
