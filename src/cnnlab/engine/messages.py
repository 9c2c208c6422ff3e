"""The sentences a training run tells its user besides the epoch rows: what is about to
train (``setup_line``), what makes a batch (``batch_recipe``), how early stopping ended a
run (``early_stop``, also report.json's entry) and the hint when validation stays far below
training (``overfitting_hint``)."""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.device import CpuPlan
from cnnlab.engine.progress import short_float
from cnnlab.engine.task import TrainingTask
from cnnlab.tasks.spec import MetricSpec


def early_stop(cfg: TrainConfig, best_label: str, epoch: int, stale: int, best: int) -> dict:
    """How early stopping ended a run after ``epoch`` epochs: report.json's ``early_stop``."""
    gain = f" by more than {cfg.min_delta:g}" if cfg.min_delta else ""
    return {
        "epoch": epoch,
        "of": cfg.epochs,
        "patience": cfg.patience,
        "min_delta": cfg.min_delta,
        "reason": f"{best_label} did not improve{gain} for {stale} epochs (patience"
        f" {cfg.patience}; best weights: epoch {best})",
    }


def setup_line(
    cfg: TrainConfig,
    task: TrainingTask,
    model: nn.Module,
    device: torch.device,
    processes: int,
    plan: CpuPlan,
) -> str:
    """What is about to train, before the first epoch: the split, the model, the device
    and the resolved CPU plan (``cnnlab.engine.prepare.resolve``)."""
    splits = task.splits
    sizes = [f"{len(splits.train):,} train", f"{len(splits.val):,} val"]
    if getattr(splits, "test", None):
        sizes.append(f"{len(splits.test):,} test")
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = f"{params:,} parameters" + (
        f" ({trainable:,} trainable)" if trainable != params else ""
    )
    where = f"{device.type if device.type == 'cpu' else device} ({plan.describe()})"
    if processes > 1:
        where = f"{processes} processes on {device.type}"
    line = (
        f"{' / '.join(sizes)} images, {len(task.classes)} classes; {cfg.model}, {counted};"
        f" {where}; {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
        f" of batches of {cfg.batch_size}"
    )
    if cfg.batch_size > len(splits.train):
        line += f" (more than the {len(splits.train)} training images: one step per epoch)"
    recipe = batch_recipe(cfg)[1:]
    if cfg.ema is not None:
        recipe.append(f"the weights' moving average (decay {cfg.ema:g}) evaluated")
    return line + "".join(f"; {part}" for part in recipe)


GAP_HINTED = 0.25  # train score this far (25 points) above validation's: a hint


def overfitting_hint(
    spec: MetricSpec, history: list[dict], cfg: TrainConfig, train_images: int
) -> str:
    """A hint when validation stays far below training (as fastai and Ultralytics give):
    the model learnt the training images, not the task; '' when it did not happen or the
    task has no training score to compare."""
    if spec.train is None or not any(f.key == spec.train.key for f in spec.val):
        return ""
    last = history[-1]
    key = spec.train.key
    train, val = last.get(f"train_{key}"), last.get(f"val_{key}")
    if train is None or val is None or train - val < GAP_HINTED:
        return ""
    steps = -(-train_images // cfg.batch_size)
    advice = []
    if cfg.weights is None:
        advice.append("start from pretrained weights (--weights torchvision)")
    advice += [
        "a smaller model",
        f"more epochs (--epochs {2 * cfg.epochs})",
        f"a lower --lr ({short_float(cfg.lr / 10)})",
    ]
    if cfg.augment in ("none", "light"):
        advice.append("stronger augmentation (--augment strong)")
    label = spec.train.label
    return (
        f"hint: val {label} {spec.train.shown(val)} is far below train {label}"
        f" {spec.train.shown(train)}: the model learnt the {train_images:,} training images"
        f" ({steps} steps an epoch), not what tells the classes apart. Try "
        + ", ".join(advice)
        + "; curves.png shows when the two parted."
    )


def batch_recipe(cfg: TrainConfig) -> list[str]:
    """What makes a training batch, in words: the augmentation, then any batch mixing."""
    mixes = (("mixup", cfg.mixup), ("cutmix", cfg.cutmix))
    return [f"augment {cfg.augment}", *(f"{name} {alpha:g}" for name, alpha in mixes if alpha)]
