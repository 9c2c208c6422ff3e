"""The inference contract: what a finished run needs from its task. ``load_run`` (and so
the command line, the web page and export) calls only what is declared here; training
is the other contract, ``cnnlab.engine.task.TrainingTask``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cnnlab.checkpoint import ModelMeta
    from cnnlab.tasks.options import Option


@runtime_checkable
class InferenceTask(Protocol):
    """A trained model's task: preprocessing, prediction, evaluation, drawing and text."""

    name: ClassVar[str]  # model.json's "task"
    options: ClassVar[tuple[Option, ...]]  # its prediction options (``cnnlab.tasks.TASKS``)
    channels_last: ClassVar[bool]  # the model runs faster in channels_last (it trained so)
    eval_split: ClassVar[str]  # what `cnnlab eval RUN` reports on by default
    drawings: ClassVar[tuple[str, ...]]  # the PNGs ``draw`` returns, by name, in order
    csv_columns: ClassVar[tuple[str, ...]]  # the header of `predict --save-csv`
    # What an exported graph's logits are: "images" (N, K), "labels" (N, K) of a
    # multi-label classifier (a sigmoid and a threshold per label), "pixels" (N, K, H, W at
    # any size), or None where the model declares its own graph (a detector's contract).
    exported_logits: ClassVar[str | None]
    classes: list[str]
    in_channels: int
    img_size: int  # the square side the model was trained at
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> InferenceTask:
        """The task of a finished run, from its model.json."""
        ...

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """The model's float input (C, S, S) for a uint8 image (in_channels, H, W)."""
        ...

    def predict(
        self, model: nn.Module, images: list[torch.Tensor], device: torch.device, **options: Any
    ) -> list[dict]:
        """One JSON-ready result per uint8 image; ``options`` are the task's ``predict``
        options, already checked (``cnnlab.tasks.options.resolve_options``)."""
        ...

    def evaluate(self, model: nn.Module, data: Any, device: torch.device, **options: Any) -> dict:
        """The task's metrics on ``data`` (from ``eval_data``); entries starting with ``_``
        are for plots."""
        ...

    def eval_data(self, split_file: Path, data_dir: Path | None, split: str) -> Any:
        """What ``evaluate`` takes: the run's own ``split`` (from ``split_file``) or, with
        ``data_dir``, that folder's."""
        ...

    def split_images(self, split_file: Path, split: str) -> list[Path]:
        """The image files of the run's own ``split``."""
        ...

    def test_time_augmented(self, model: nn.Module, config_file: Path) -> nn.Module:
        """``model`` averaging its answers over the views the run trained on, or a
        CnnlabError where the task has none."""
        ...

    def draw(self, image: torch.Tensor, result: dict) -> dict[str, bytes]:
        """PNGs of one prediction, by the names in ``drawings``."""
        ...

    def describe(self, result: dict) -> str:
        """One prediction in a few words, as `cnnlab predict` prints it."""
        ...

    def csv_rows(self, result: dict) -> list[tuple]:
        """One prediction's rows under ``csv_columns``."""
        ...

    def headline(self, report: dict) -> str:
        """A report in one line, as `cnnlab train` and `eval` print it."""
        ...

    def details(self, report: dict) -> list[str]:
        """Lines printed after the headline (the most frequent mistakes, per class)."""
        ...
