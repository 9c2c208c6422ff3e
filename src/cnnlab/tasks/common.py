"""What every task knows about its run, and the helpers the tasks share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from cnnlab.checkpoint import ModelMeta
from cnnlab.errors import CnnlabError

T = TypeVar("T")
PREDICT_BATCH = 16  # images per forward pass when predicting or evaluating from files


@dataclass
class RunFacts:
    """The classes, input and normalisation a model is trained with (model.json's), and,
    while training, the data splits."""

    classes: list[str]
    in_channels: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: Any = None

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> Any:
        """The task of a finished run, from its model.json."""
        channels, size, _ = meta.input_size
        return cls(list(meta.classes), channels, size, tuple(meta.mean), tuple(meta.std))

    def after_training(
        self, model: nn.Module, device: torch.device, say: Callable[[str], None]
    ) -> str | None:
        """Fit what ``model`` learns after its gradient training from the training split
        (``say`` tells the user it has begun), and return a line saying what was fitted;
        None when there is nothing to fit (every task's models but R-CNN, whose SVMs
        ``DetectTask`` fits)."""
        return None

    def test_time_augmented(self, model: nn.Module, config_file: Path) -> nn.Module:
        """``model`` averaging its answers over augmented views (classification's; a task
        whose answers are maps or boxes has none)."""
        name = getattr(self, "name", "this")
        raise CnnlabError(f"--tta averages class probabilities: not for {name} runs")


def per_class_line(label: str, values: dict[str, float | None], spec: str) -> str:
    """``"LABEL: a 0.12, b 0.80"``: each class's figure (formatted by ``spec``), lowest
    first, classes without one left out."""
    known = sorted(((v, name) for name, v in values.items() if v is not None))
    return f"{label}: " + ", ".join(f"{name} {value:{spec}}" for value, name in known)


def measured_on(report: dict) -> str:
    """What a report's figures are of, for its headline: "test", or the folder it read
    ("data/other", "data/other/test")."""
    return report.get("data") or report.get("split") or "test"


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
