"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's lr_find).

Train a fresh model (the same data, split, transforms, weights, freezing and optimizer that
``cnnlab train`` would use) for ``steps`` steps while the learning rate grows exponentially
from ``start_lr`` to ``end_lr``, and record the loss. The raw loss is noisy, so it is
smoothed with an exponential moving average (``beta`` 0.98) divided by ``1 - beta**(i+1)``
to remove the average's bias towards its zero start. The test stops early once the smoothed
loss exceeds ``4 x`` its best: past that point the loss has exploded.

The suggested learning rate is where the smoothed loss falls fastest on its way down to
its minimum: the most negative slope of loss against log(lr), each slope measured across a
tenth of the points on either side, because step-to-step slopes are mostly noise. When the
minimum comes too early for that (within the first fifth), it falls back to the learning
rate of the minimum divided by 10. Both are rules of thumb: look at the plot. Nothing here
touches a run folder; the model is thrown away afterwards.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cnnlab import transfer
from cnnlab.config import DEFAULT_WEIGHT_DECAY, TrainConfig
from cnnlab.device import pick_device
from cnnlab.engine.loop import Step, build_model
from cnnlab.engine.optim import amp_dtype, make_optimizer
from cnnlab.engine.state import seed_everything
from cnnlab.errors import CnnlabError
from cnnlab.registry import model_info
from cnnlab.tasks import task_class

DIVERGE = 4.0  # stop when the smoothed loss exceeds this many times its best


@dataclass
class LRFindResult:
    """The range test's curve and its suggestion."""

    lrs: list[float]  # learning rate of each step
    losses: list[float]  # smoothed (bias-corrected) loss after each step
    suggested_lr: float

    def to_dict(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "lrs": self.lrs, "losses": self.losses}


def lr_find(
    cfg: TrainConfig,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
) -> LRFindResult:
    """Run the range test for the model and data of ``cfg``, any task (its ``lr`` and
    schedule are ignored; ``out`` is not written to)."""
    if not 0 < start_lr < end_lr:
        raise CnnlabError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise CnnlabError(f"steps must be at least 2, got {steps}")
    if not 0 <= beta < 1:
        raise CnnlabError(f"beta must be in [0, 1), got {beta}")
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer])
    cfg, task = task_class(model_info(cfg.model).task).setup(cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = task.loaders(cfg, generator, device)[0]
    model, _ = build_model(cfg, task, pretrained=True)
    model.to(device).train()
    if cfg.freeze_backbone:
        transfer.freeze_backbone(model)
        transfer.backbone_norms_eval(model)
    optimizer = make_optimizer(model, cfg)
    scale = [group["lr"] / cfg.lr for group in optimizer.param_groups]  # backbone_lr_mult
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = Step(model, task, optimizer, scaler, device, dtype, cfg.grad_clip)

    lrs, losses = [], []
    average, best = 0.0, math.inf
    for i, (images, targets) in enumerate(_forever(train_loader, steps)):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        for group, factor in zip(optimizer.param_groups, scale, strict=True):
            group["lr"] = lr * factor
        loss = step(images, targets)[0].item()
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGE * best:
            break
        best = min(best, smoothed)
    if not cfg.quiet:
        print(f"lr-find: {len(lrs)} steps, lr {lrs[0]:.1e} .. {lrs[-1]:.1e}", file=sys.stderr)
    return LRFindResult(lrs, losses, suggest_lr(lrs, losses))


def _forever(loader: torch.utils.data.DataLoader, steps: int):
    """``steps`` non-empty batches, going round the loader as often as needed."""
    taken = 0
    while taken < steps:
        before = taken
        for images, targets in loader:
            if len(images) == 0:
                continue
            yield images, targets
            taken += 1
            if taken == steps:
                return
        if taken == before:
            raise CnnlabError("no readable training images")


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The lr where ``losses`` fall fastest before their minimum, the slope over log(lr)
    taken across a window of a tenth of the points on each side (a single step's slope is
    mostly noise); with too few points before the minimum, the lr of the minimum / 10."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if not finite:
        return lrs[0]
    x = np.log10([lr for lr, _ in finite])
    y = np.array([loss for _, loss in finite])
    lowest = int(np.argmin(y))
    half = max(1, len(y) // 10)
    if lowest < 2 * half:
        return float(finite[lowest][0] / 10)
    centres = np.arange(half, lowest + 1)
    left, right = centres - half, np.minimum(centres + half, lowest)
    slopes = (y[right] - y[left]) / (x[right] - x[left])
    return float(finite[int(centres[np.argmin(slopes)])][0])


def png_path(out: str | Path | None) -> Path:
    """``--out`` as a PNG path: a .png name as is, anything else a folder for lr_find.png."""
    path = Path(out) if out is not None else Path.cwd()
    if path.suffix.lower() == ".png":
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    if path.exists() and not path.is_dir():
        raise CnnlabError(f"{path} is a file; --out needs a folder or a .png name")
    path.mkdir(parents=True, exist_ok=True)
    return path / "lr_find.png"
