"""The training contract: what the training loop needs from a task, and nothing more.

``cnnlab.tasks`` has one implementation per task (classify, segment, detect); the loop in
``cnnlab.engine.loop`` calls only what is declared here and knows no task by name. Its
caller resolves which task a run is (``cnnlab.training.task_of_model``) and hands the class
in. What a finished run needs of a task is the other contract,
``cnnlab.tasks.inference.InferenceTask``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader

from cnnlab.config import TrainConfig
from cnnlab.tasks.spec import MetricSpec


@runtime_checkable
class TrainingTask(Protocol):
    """One task's data, loss, metric and pictures for ``cnnlab.engine.loop.fit``."""

    name: ClassVar[str]  # model.json's "task"
    metrics: ClassVar[MetricSpec]  # metrics.csv, the epoch line, the best checkpoint, curves
    channels_last: ClassVar[bool]  # train in channels_last on CUDA
    classes: list[str]
    in_channels: int
    img_size: int
    mean: tuple[float, ...]  # normalisation the model is trained with
    std: tuple[float, ...]
    splits: Any  # which files train and validate: .root, .train, .val (.test where the task
    # has one), .to_json() (split.json)

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, TrainingTask]:
        """The run's resolved settings (image size, channels) and the task with its splits:
        a new split of ``cfg.data``, or the one a resumed run saved in ``split_file``."""
        ...

    def loaders(
        self,
        cfg: TrainConfig,
        generator: torch.Generator,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[DataLoader, Any, Any]:
        """(training batches, what ``evaluate`` takes for val, the same for test or None)."""
        ...

    def forward_loss(
        self, net: nn.Module, images: torch.Tensor, targets: Any
    ) -> tuple[torch.Tensor, tuple | None]:
        """(training loss, (right, scored) answers as device tensors or ints, or None)."""
        ...

    def evaluate(
        self,
        model: nn.Module,
        data: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict:
        """The task's metrics on ``data`` (entries starting with ``_`` are for plots)."""
        ...

    def after_training(
        self, model: nn.Module, device: torch.device, say: Callable[[str], None]
    ) -> str | None:
        """Fit what the model learns after gradient training (R-CNN's SVMs) into ``model``,
        which holds the best weights, telling the user through ``say`` when it begins; a
        line saying what was fitted, or None when nothing changed."""
        ...

    def finish(
        self,
        model: nn.Module,
        val: Any,
        test: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        run_dir: Path,
    ) -> tuple[str, dict]:
        """(split name, results) of the best weights for report.json; draws the task's
        plots into ``run_dir`` (the loop draws curves.png)."""
        ...

    def batch_pictures(self, images: torch.Tensor, targets: Any) -> list[tuple[torch.Tensor, str]]:
        """(uint8 picture, caption) of each image of a training batch, for batch.png."""
        ...
