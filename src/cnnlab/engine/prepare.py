"""What a training needs before its first step, shared by the loop (``cnnlab.engine.loop``)
and the learning-rate range test (``cnnlab.lr_find``): ``resolve`` settles once what the
unset settings mean on this machine (device, threads, loader workers, weight decay), and
``prepare`` builds the loaders, the model, its optimizer and the mixed-precision scaler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import cnnlab.engine.distributed as distributed
from cnnlab import checkpoint, transfer
from cnnlab.config import DEFAULT_WEIGHT_DECAY, TrainConfig
from cnnlab.device import CpuPlan, cpu_plan, pick_device
from cnnlab.engine.optim import amp_dtype, make_optimizer
from cnnlab.engine.task import TrainingTask
from cnnlab.models.factory import create_model, model_info
from cnnlab.registry import check_input_size
from cnnlab.version import __version__


@dataclass(frozen=True)
class Resolved:
    """What ``auto`` and the unset settings became for this process: recorded in the run's
    config.yaml (``resolved``) while the settings themselves keep the user's choice, so a
    resumed run decides again on its machine."""

    device: torch.device  # under torchrun, this process's own GPU
    plan: CpuPlan  # torch threads and DataLoader workers
    processes: int  # training processes sharing this machine's cores

    def record(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "threads": self.plan.threads,
            "workers": self.plan.workers,
            "processes": self.processes,
        }


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, Resolved]:
    """``cfg`` with its weight decay settled (the optimizer's default when unset) and the
    device and CPU plan it trains with (``cnnlab.device``). The task settles the image
    size and channels from the data (its ``setup``)."""
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=DEFAULT_WEIGHT_DECAY[cfg.optimizer])
    ctx = distributed.context()
    device = distributed.local_device(pick_device(cfg.device), ctx)
    processes = local_processes(ctx)
    plan = cpu_plan(cfg.threads, cfg.workers, device.type, processes)
    return cfg, Resolved(device, plan, processes)


def local_processes(ctx: distributed.Context) -> int:
    """How many training processes share this machine's cores (torchrun's
    LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


@dataclass
class Prepared:
    """A task's data and a model ready to take its first optimizer step."""

    train_loader: DataLoader
    val_data: Any  # what the task's ``evaluate`` takes
    test_data: Any  # the same for the test split, or None
    model: nn.Module  # on the device, in train mode, trainable parameters only optimised
    model_args: dict  # the create_model arguments that rebuild it (model.json's)
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None  # CUDA mixed precision, or None
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format


def prepare(
    cfg: TrainConfig,
    task: TrainingTask,
    resolved: Resolved,
    generator: torch.Generator,
    pretrained: bool,
    rank: int = 0,
    world_size: int = 1,
) -> Prepared:
    """The loaders of ``task``, the model of ``cfg`` (with ``cfg.weights`` when
    ``pretrained``: a fresh run; a resumed one restores every weight itself), its
    optimizer and mixed precision, on ``resolved.device``."""
    device = resolved.device
    loaders = task.loaders(
        replace(cfg, workers=resolved.plan.workers), generator, device, rank, world_size
    )
    model, model_args = build_model(cfg, task, pretrained)
    model.to(device).train()
    memory_format = torch.preserve_format
    if device.type == "cuda" and task.channels_last:
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    if cfg.freeze_backbone:
        transfer.freeze_backbone(model)  # before the optimizer, which takes trainable ones
    dtype = amp_dtype(cfg.amp, device)
    return Prepared(
        *loaders,
        model=model,
        model_args=model_args,
        optimizer=make_optimizer(model, cfg),
        autocast_dtype=dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        memory_format=memory_format,
    )


def build_model(cfg: TrainConfig, task: TrainingTask, pretrained: bool) -> tuple[nn.Module, dict]:
    """The model for ``task``'s classes and the create_model arguments that rebuild it
    (model.json's ``model_args``).

    ``weights`` and the ``backbone_weights`` of ``model_args`` are read for a fresh run
    only (``pretrained``) and left out of the arguments: best.safetensors holds every
    weight. The image size is checked against what the built model accepts."""
    info = model_info(cfg.model)
    args: dict[str, Any] = {"num_classes": len(task.classes), "in_channels": cfg.in_channels}
    if info.takes_img_size:
        args["img_size"] = cfg.img_size
    args.update(cfg.model_args)
    backbone_weights = args.pop("backbone_weights", None)
    weights = {"weights": cfg.weights_file or cfg.weights, "backbone_weights": backbone_weights}
    model = create_model(cfg.model, **(weights if pretrained else {}), **args)
    check_input_size(model, cfg.img_size, cfg.img_size, "images (img_size)")
    return model, args


def model_meta(cfg: TrainConfig, task: TrainingTask, model_args: dict) -> checkpoint.ModelMeta:
    """What model.json records: the model, its classes, input size and normalisation."""
    return checkpoint.ModelMeta(
        task=task.name,
        architecture=cfg.model,
        model_args=model_args,
        classes=list(task.classes),
        input_size=[cfg.in_channels, cfg.img_size, cfg.img_size],
        mean=list(task.mean),
        std=list(task.std),
        cnnlab_version=__version__,
        # 0.5 until the run fits each label's own after training (a multi-label task).
        thresholds=[0.5] * len(task.classes) if getattr(task, "multi_label", False) else None,
    )
