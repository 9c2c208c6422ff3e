"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's lr_find).

Train a fresh model (the same data, split, transforms, weights, freezing and optimizer that
``cnnlab train`` would use) for ``steps`` steps while the learning rate grows exponentially
from ``start_lr`` to ``end_lr``, and record the loss. The raw loss is noisy, so it is
smoothed with an exponential moving average divided by ``1 - beta**(i+1)`` to remove the
average's bias towards its zero start. The average spans a tenth of the sweep (``beta =
1 - 10 / steps``, within 0.5..0.98: fastai's 0.98 for its 100 steps would, over 30, be
nearly the mean of every loss so far, lagging so far behind the fall that a lucky first
batch stays the minimum). The test stops early once the smoothed
loss exceeds ``4 x`` its best: past that point the loss has exploded.

The suggested learning rate is where the smoothed loss falls fastest on its way down to
its minimum: the most negative slope of a straight line fitted to loss against log(lr)
over a fifth of the points, because step-to-step slopes are mostly noise. The first tenth
of the points is left out: there the average holds only a few losses, and one lucky
batch would look like the steepest fall. When the minimum comes too early for a fit (or
the loss never falls), it falls back to the learning rate of the minimum divided by 10.
Both are rules of thumb: look at the plot. Nothing here touches a run folder; the model
is thrown away afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab import transfer
from cnnlab.config import TrainConfig
from cnnlab.destinations import check_targets
from cnnlab.device import threads_for
from cnnlab.engine.prepare import Resolved, prepare, resolve
from cnnlab.engine.progress import Reporter
from cnnlab.engine.state import seed_everything
from cnnlab.engine.step import Step
from cnnlab.engine.task import TrainingTask
from cnnlab.errors import CnnlabError
from cnnlab.training import task_of_model

DIVERGE = 4.0  # stop when the smoothed loss exceeds this many times its best


@dataclass
class LRFindResult:
    """The range test's curve and its suggestion."""

    lrs: list[float]  # learning rate of each step
    losses: list[float]  # smoothed (bias-corrected) loss after each step
    suggested_lr: float
    stopped: str | None = None  # why the sweep ended before its last step, if it did

    def to_dict(self) -> dict:
        return {
            "suggested_lr": self.suggested_lr,
            "lrs": self.lrs,
            "losses": self.losses,
            "stopped": self.stopped,
        }


def lr_find(
    cfg: TrainConfig,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    beta: float | None = None,
) -> LRFindResult:
    """Run the range test for the model and data of ``cfg``, any task (its ``lr`` and
    schedule are ignored; ``out`` is not written to)."""
    if not 0 < start_lr < end_lr:
        raise CnnlabError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    if steps < 2:
        raise CnnlabError(f"steps must be at least 2, got {steps}")
    beta = smoothing_for(steps) if beta is None else beta
    if not 0 <= beta < 1:
        raise CnnlabError(f"beta must be in [0, 1), got {beta}")
    cfg, resolved = resolve(cfg)
    cfg, task = task_of_model(cfg.model).setup(cfg)
    seed_everything(cfg.seed)
    with threads_for(resolved.plan.threads):
        return _range_test(cfg, task, resolved, start_lr, end_lr, steps, beta)


def _range_test(
    cfg: TrainConfig,
    task: TrainingTask,
    resolved: Resolved,
    start_lr: float,
    end_lr: float,
    steps: int,
    beta: float,
) -> LRFindResult:
    generator = torch.Generator().manual_seed(cfg.seed)
    ready = prepare(cfg, task, resolved, generator, pretrained=True)
    model, optimizer = ready.model, ready.optimizer
    if cfg.freeze_backbone:
        transfer.backbone_norms_eval(model)
    scale = [group["lr"] / cfg.lr for group in optimizer.param_groups]  # backbone_lr_mult
    step = Step(
        model,
        task,
        optimizer,
        ready.scaler,
        resolved.device,
        ready.autocast_dtype,
        cfg.grad_clip,
        ready.memory_format,
    )
    train_loader = ready.train_loader

    lrs, losses = [], []
    smooth, best, stopped = Smoothed(beta), math.inf, None
    say = Reporter(cfg.quiet, None)
    say.start("lr-find", steps)
    try:
        for i, (images, targets) in enumerate(_forever(train_loader, steps)):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for group, factor in zip(optimizer.param_groups, scale, strict=True):
                group["lr"] = lr * factor
            loss = step(images, targets)[0].item()
            smoothed = smooth.add(loss)
            lrs.append(lr)
            losses.append(smoothed)
            say.advance(lambda now, lr=lr, smoothed=smoothed: f"lr {lr:.1e}  loss {smoothed:.3f}")
            if not math.isfinite(smoothed):
                stopped = f"the loss became {smoothed} at lr {lr:.1e}"
            elif smoothed > DIVERGE * best:
                stopped = (
                    f"the smoothed loss {smoothed:.3g} passed {DIVERGE:g}x its best ({best:.3g})"
                    f" at lr {lr:.1e}: it diverged"
                )
            if stopped is not None and len(lrs) < steps:
                break
            best = min(best, smoothed)
    finally:
        say.stop()
    early = f"stopped after step {len(lrs)} of {steps}: {stopped}" if len(lrs) < steps else None
    say.line(f"lr-find: {len(lrs)} steps, lr {lrs[0]:.1e} .. {lrs[-1]:.1e}")
    return LRFindResult(lrs, losses, suggest_lr(lrs, losses), early)


def smoothing_for(steps: int) -> float:
    """The moving average's beta for a sweep of ``steps``: it spans a tenth of them."""
    return min(0.98, max(0.5, 1 - 10 / steps))


class Smoothed:
    """A bias-corrected exponential moving average, fed one value at a time."""

    def __init__(self, beta: float) -> None:
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, value: float) -> float:
        """Take ``value``; return the average so far."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta**self.count)


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
    """The lr at the centre of the steepest fall of ``losses`` before their minimum: the
    most negative slope of a line fitted over log(lr) across a fifth of the points, none
    from the first tenth (see the module doc); the lr of the minimum / 10 when no fall can
    be fitted."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if not finite:
        return lrs[0]
    x = np.log10([lr for lr, _ in finite])
    y = np.array([loss for _, loss in finite])
    lowest = int(np.argmin(y))
    skip, width = max(1, len(y) // 10), max(3, len(y) // 5)
    starts = range(skip, lowest - width + 2)  # windows [s, s + width) ending by the minimum
    slopes = [np.polyfit(x[s : s + width], y[s : s + width], 1)[0] for s in starts]
    if not slopes or min(slopes) >= 0:
        return float(finite[lowest][0] / 10)
    steepest = starts[int(np.argmin(slopes))]
    return float(finite[steepest + width // 2][0])


def png_path(out: str | Path | None, overwrite: bool = False, data: Sequence[Path] = ()) -> Path:
    """``--out`` as a PNG path: a .png name as is, anything else a folder for lr_find.png;
    checked by the output rule (``check_targets``: an existing file only with
    ``overwrite``, never inside the ``data`` folders) before its folder is made."""
    path = Path(out) if out is not None else Path.cwd()
    if path.suffix.lower() != ".png":
        if path.exists() and not path.is_dir():
            raise CnnlabError(f"{path} is a file; --out needs a folder or a .png name")
        path = path / "lr_find.png"
    check_targets([path], [], overwrite, "--out", data)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
