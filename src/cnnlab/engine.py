"""Training and evaluation: one loop, read top to bottom in ``_fit``.

The same loop trains classifiers, segmentation and detection models. What differs
between tasks (data, the loss, the per-batch score, evaluation, which validation number
picks the best checkpoint, metrics columns and plots) lives in a ``Task`` object:
``ClassifyTask`` here, ``SegmentTask`` in cnnlab.segment, ``DetectTask`` in cnnlab.detect.
Everything a run produces goes to its run folder (see ``train``), each
file written atomically, so a crash or a SIGKILL never leaves a half-written file and
``resume`` continues exactly where the last completed epoch left off.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import random
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cnnlab import checkpoint, distributed, metrics, plots, transfer
from cnnlab.errors import CnnlabError
from cnnlab.registry import create_model, model_info

METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "seconds",
)
CHOICES = {
    "optimizer": ("adam", "adamw", "sgd"),
    "balance": ("none", "weights", "sampler"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "lr_interval": ("step", "epoch"),
    "augment": ("none", "light", "strong"),
}
# AdamW's decoupled decay wants a much larger value than SGD's L2 penalty (timm's defaults).
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.05, "sgd": 5e-4}
WORST_IMAGES = 16  # highest-loss test images kept for errors.png
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2014, section 5)
_RANK_SEED_STRIDE = 1_000_003  # keeps the processes' per-epoch seeds apart (a prime)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved (resolved) as RUN/config.yaml."""

    data: str  # folder of class folders, or with train/ val/ (test/) inside
    out: str  # run folder to create; refused when it already holds a run
    model: str = "resnet18"  # registered model name (`cnnlab models`)
    model_args: dict = field(default_factory=dict)  # extra builder kwargs, e.g. {"cdims": [32, 64]}
    weights: str | None = None  # initial weights: a file, or "torchvision"
    weights_file: str | None = None  # filled in: the weight file actually read
    weights_sha256: str | None = None  # filled in: its SHA-256, to tell which weights they were
    freeze_backbone: bool = False  # train the head only; backbone BatchNorm statistics too
    backbone_lr_mult: float = 1.0  # backbone learning rate = lr x this; the head gets lr
    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # images per optimizer step, over all processes together
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    optimizer: str = "adamw"  # adam | adamw | sgd (momentum 0.9, Nesterov)
    weight_decay: float | None = None  # None: 0.05 adamw, 5e-4 sgd, 0 adam; never on norms/biases
    warmup_epochs: int = 1  # linear warm-up length, then cosine decay to 0
    lr_interval: str = "step"  # the schedule advances every "step" or every "epoch"
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    img_size: int | None = None  # square input side; None: the model's natural size
    in_channels: int | None = None  # None: 1 when every sampled image is grayscale, else 3
    augment: str = "light"  # none | light | strong training augmentation
    flip: bool = True  # random horizontal flips (turn off for digits, text, ...)
    label_smoothing: float = 0.0  # cross-entropy label smoothing for training
    patience: int | None = None  # stop after this many epochs without a better val top-1
    val_split: float = 0.1  # fraction held out for validation (unless DIR/val exists)
    test_split: float = 0.1  # fraction held out for the final test (unless DIR/test exists)
    balance: str = "none"  # none | weights (weighted loss) | sampler (balanced batches)
    amp: str = "auto"  # CUDA mixed precision: auto (bf16, else fp16) | bf16 | fp16 | off
    seed: int = 0  # split, initialisation, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader worker processes
    quiet: bool = False  # no progress bar and no per-epoch line

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise CnnlabError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.lr > 0, "lr must be positive")
        _require(self.warmup_epochs >= 0, "warmup_epochs must be 0 or more")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive")
        _require(self.img_size is None or self.img_size >= 1, "img_size must be positive")
        _require(self.in_channels in (None, 1, 3), "in_channels must be 1 or 3")
        _require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        _require(self.patience is None or self.patience >= 1, "patience must be at least 1")
        _require(0 <= self.val_split < 1, "val_split must be in [0, 1)")
        _require(0 <= self.test_split < 1, "test_split must be in [0, 1)")
        _require(self.val_split + self.test_split < 1, "val_split + test_split must be below 1")
        _require(self.workers >= 0, "workers must be 0 or more")
        _require(self.backbone_lr_mult > 0, "backbone_lr_mult must be positive")
        _require(
            not (self.freeze_backbone and self.backbone_lr_mult != 1),
            "freeze_backbone and backbone_lr_mult exclude each other (a frozen backbone"
            " has no learning rate)",
        )
        _require(
            not self.freeze_backbone or self.weights is not None,
            "freeze_backbone needs weights: a frozen random backbone learns nothing",
        )
        # JSON types only, so config.yaml and model.json hold plain lists, never tuples.
        self.model_args = json.loads(json.dumps(self.model_args))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build a config from a mapping, refusing unknown keys and wrongly typed values."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise CnnlabError(f"unknown config key {unknown[0]!r} (known: {known})")
        for key, value in data.items():
            if not _has_type(value, hints[key]):
                raise CnnlabError(f"config key {key!r}: {value!r} is not a {hints[key]}")
        return cls(**data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CnnlabError(message)


def _has_type(value: Any, hint: Any) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
    if value is None:
        return type(None) in options
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if base is int and isinstance(value, bool):
            continue
        if base is not type(None) and isinstance(value, base):
            return True
    return False


# ---------------------------------------------------------------------------- the task


class Task:
    """What the loop in ``_fit`` needs to know about a task; ``ClassifyTask`` below,
    ``cnnlab.segment.SegmentTask`` and ``cnnlab.detect.DetectTask`` fill it in.

    The class prepares a run (``setup`` for a new one, ``reopen`` for a resumed one) and
    ``for_run`` makes the object the loop uses. The defaults here suit a model that maps
    images to outputs scored by ``loss``, evaluated on the validation set only.
    """

    name: ClassVar[str]  # model.json's "task"
    columns: ClassVar[tuple[str, ...]]  # metrics.csv
    curves: ClassVar[dict]  # curves.png: panel title -> metrics.csv columns
    best_label: ClassVar[str]  # what picks the best checkpoint, for messages
    score_label: ClassVar[str | None] = None  # running train score on the progress bar
    channels_last: ClassVar[bool] = False  # on CUDA

    # -- before the loop

    @classmethod
    def setup(cls, cfg: TrainConfig) -> tuple[TrainConfig, Any]:
        """A new run's resolved settings and its splits (with ``to_json``)."""
        raise NotImplementedError

    @classmethod
    def reopen(cls, cfg: TrainConfig, split_json: dict) -> tuple[TrainConfig, Any]:
        """A resumed run's settings (from config.yaml) and splits (from split.json)."""
        raise NotImplementedError

    @classmethod
    def for_run(cls, cfg: TrainConfig, splits: Any, device: torch.device) -> Task:
        raise NotImplementedError

    def build_model(self, cfg: TrainConfig, pretrained: bool) -> tuple[nn.Module, dict]:
        """The model and the create_model arguments that rebuild it (for model.json).

        ``weights`` and the ``backbone_weights`` of ``model_args`` are read for a fresh run
        only and left out of the arguments: best.safetensors holds every weight."""
        args = {"num_classes": len(self.classes), "in_channels": cfg.in_channels}
        args.update(cfg.model_args)
        backbone_weights = args.pop("backbone_weights", None)
        weights = {"weights": cfg.weights, "backbone_weights": backbone_weights}
        try:
            model = create_model(cfg.model, **(weights if pretrained else {}), **args)
        except TypeError as error:  # a model_args key the builder does not take
            raise CnnlabError(f"{cfg.model}: {error}") from None
        return model, args

    def loaders(
        self,
        cfg: TrainConfig,
        splits: Any,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator,
        device: torch.device,
        ctx: distributed.Context,
    ) -> tuple[DataLoader, Any, Any]:
        """(training batches, what ``evaluate`` takes for val, the same for test or None)."""
        raise NotImplementedError

    # -- every step

    @staticmethod
    def to_device(targets: Any, device: torch.device) -> Any:
        return targets.to(device, non_blocking=True)

    def forward_loss(self, net: nn.Module, images: torch.Tensor, targets: Any) -> tuple:
        """(outputs, training loss) of one batch."""
        outputs = net(images)
        return outputs, self.loss(outputs, targets)

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def score(self, outputs: Any, targets: Any) -> tuple | None:
        """(right, scored) answers in the batch as device tensors or ints, or None."""
        return None

    # -- every epoch

    def evaluate(
        self,
        model: nn.Module,
        data: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict:
        raise NotImplementedError

    def rank(self, val: dict) -> tuple[float, ...]:
        """Validation results as a tuple; the best checkpoint has the highest."""
        raise NotImplementedError

    def history_row(self, train_score: float | None, val: dict) -> dict:
        """The task's metrics.csv columns of one epoch."""
        raise NotImplementedError

    def summary(self, row: dict) -> str:
        """The task's part of the one-line epoch summary."""
        raise NotImplementedError

    # -- after the loop

    def final_evaluation(
        self,
        model: nn.Module,
        val: Any,
        test: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> tuple[str, dict]:
        """(split name, results) for report.json."""
        return "val", self.evaluate(model, val, device, autocast_dtype)

    def write_plots(self, run_dir: Path, result: dict, mean, std) -> None:
        """Plots beyond curves.png (which the loop draws)."""

    def headline(self, report: dict) -> str:
        raise NotImplementedError


@dataclass
class ClassifyTask(Task):
    """Image classification: cross-entropy, top-1/top-5, best checkpoint by val top-1."""

    classes: list[str]
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None  # (K,) on the training device
    name: ClassVar[str] = "classify"
    columns: ClassVar[tuple[str, ...]] = METRICS_COLUMNS
    curves: ClassVar[dict] = plots.CLASSIFY_CURVES
    score_label: ClassVar[str | None] = "top1"
    best_label: ClassVar[str] = "val top-1"
    channels_last: ClassVar[bool] = True

    # -- before the loop

    @classmethod
    def setup(cls, cfg: TrainConfig) -> tuple[TrainConfig, Any]:
        """A new run's resolved settings and its stratified split of ``cfg.data``."""
        from cnnlab.data.folders import make_splits

        cfg = _resolve_model_settings(cfg)
        if cfg.weights is not None:
            path = transfer.resolve_weights(cfg.model, cfg.weights)
            cfg = replace(cfg, weights_file=str(path), weights_sha256=transfer.sha256_of(path))
        splits = make_splits(Path(cfg.data), cfg.val_split, cfg.test_split, cfg.seed)
        return _resolve_channels(cfg, splits), splits

    @classmethod
    def reopen(cls, cfg: TrainConfig, split_json: dict) -> tuple[TrainConfig, Any]:
        """A resumed run's settings (from config.yaml) and split (from split.json)."""
        from cnnlab.data.folders import Splits

        return _resolve_model_settings(cfg), Splits.from_json(split_json)

    @classmethod
    def for_run(cls, cfg: TrainConfig, splits: Any, device: torch.device) -> ClassifyTask:
        task = cls(splits.classes, cfg.label_smoothing)
        if cfg.balance == "weights":
            from cnnlab.data.datasets import class_weights

            task.class_weights = class_weights(splits.train, len(splits.classes)).to(device)
        return task

    def build_model(self, cfg: TrainConfig, pretrained: bool) -> tuple[nn.Module, dict]:
        return _build_model(cfg, len(self.classes), pretrained)

    def loaders(
        self,
        cfg: TrainConfig,
        splits: Any,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator,
        device: torch.device,
        ctx: distributed.Context,
    ) -> tuple[DataLoader, DataLoader, DataLoader | None]:
        return _loaders(cfg, splits, mean, std, self, generator, device, ctx)

    # -- every step

    def forward_loss(
        self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), loss). A model with auxiliary classifiers (GoogLeNet with
        ``aux_logits``) returns them in training; they add 0.3 x their losses, the
        paper's weight, and only the main logits are scored."""
        outputs = net(images)
        if isinstance(outputs, tuple):
            logits, *auxiliary = outputs
            aux_loss = sum(self.loss(aux, targets) for aux in auxiliary)
            return logits, self.loss(logits, targets) + AUX_LOSS_WEIGHT * aux_loss
        return outputs, self.loss(outputs, targets)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training objective; outputs (B, K) logits, targets (B,) class indices."""
        return F.cross_entropy(
            outputs, targets, weight=self.class_weights, label_smoothing=self.label_smoothing
        )

    @staticmethod
    def score(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(right answers as a 0-dim device tensor (no sync), answers) in the batch."""
        return (outputs.argmax(dim=1) == targets).sum(), len(targets)

    @staticmethod
    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack a batch, dropping samples whose image could not be read."""
        from cnnlab.data.datasets import collate_skip_bad

        return collate_skip_bad(batch)

    # -- every epoch

    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        worst: int = 0,
    ) -> dict:
        """See ``evaluate``."""
        return evaluate(
            model, loader, device, self.classes, autocast_dtype=autocast_dtype, worst=worst
        )

    @staticmethod
    def rank(val: dict) -> tuple[float, ...]:
        """Higher is better: val top-1, then (on a tie) the lower val loss."""
        return (val["top1"], -val["loss"])

    @staticmethod
    def history_row(train_score: float | None, val: dict) -> dict:
        return {
            "train_top1": train_score,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
        }

    @staticmethod
    def summary(row: dict) -> str:
        return (
            f"train loss {row['train_loss']:.3f} top1 {100 * row['train_top1']:.1f}%"
            f"  val loss {row['val_loss']:.3f} top1 {100 * row['val_top1']:.1f}%"
        )

    # -- after the loop

    def final_evaluation(
        self,
        model: nn.Module,
        val: DataLoader,
        test: DataLoader | None,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> tuple[str, dict]:
        """(split name, result) on the test split, or val when there is none."""
        split, loader = ("test", test) if test is not None else ("val", val)
        return split, self.evaluate(model, loader, device, autocast_dtype, worst=WORST_IMAGES)

    def write_plots(self, run_dir: Path, result: dict, mean, std) -> None:
        """confusion.png and errors.png (curves.png is the loop's)."""
        plots.plot_confusion(result["_confusion"], self.classes, run_dir / "confusion.png")
        worst = result["_worst"]
        plots.plot_errors(
            list(worst["images"]),
            [self.classes[i] for i in worst["targets"].tolist()],
            [self.classes[i] for i in worst["preds"].tolist()],
            worst["losses"].tolist(),
            run_dir / "errors.png",
            mean,
            std,
        )

    @staticmethod
    def headline(report: dict) -> str:
        return f"top1 {100 * report['top1']:.2f}%  loss {report['loss']:.4f}"


def task_kind(name: str) -> type[Task]:
    """The task class of a run whose model.json says ``"task": name``."""
    if name == "classify":
        return ClassifyTask
    if name == "segment":
        from cnnlab.segment import SegmentTask

        return SegmentTask
    if name == "detect":
        from cnnlab.detect import DetectTask

        return DetectTask
    raise CnnlabError(f"unknown task {name!r} (classify, segment or detect)")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    classes: list[str],
    *,
    autocast_dtype: torch.dtype | None = None,
    worst: int = 0,
) -> dict:
    """Classification metrics of ``model`` over ``loader`` (model left in eval mode).

    Returns ``{"top1", "top5", "loss", "n", "per_class": {name: {"precision", "recall",
    "f1", "support"}}}`` (accuracies as fractions, top5 meaning top-min(5, K), loss the
    plain mean cross-entropy) plus, for plots, ``_confusion`` (K, K), ``_losses`` (N,),
    ``_preds`` (N,), ``_targets`` (N,) and, when ``worst`` > 0, ``_worst``: the ``worst``
    highest-loss samples as ``{"images", "targets", "preds", "losses"}`` CPU tensors.
    """
    model.eval()
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    all_logits, all_targets = [], []
    kept: tuple[torch.Tensor, ...] | None = None  # (images, targets, preds, losses)
    for images, targets in loader:  # (B, C, S, S), (B,)
        if len(targets) == 0:
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images).float()  # (B, K)
        all_logits.append(logits)
        all_targets.append(targets)
        if worst:
            losses = F.cross_entropy(logits, targets, reduction="none")  # (B,)
            kept = _keep_worst(kept, (images, targets, logits.argmax(dim=1), losses), worst)
    if not all_logits:
        raise CnnlabError("no readable images to evaluate")
    logits = torch.cat(all_logits).cpu()  # (N, K)
    targets = torch.cat(all_targets).cpu()  # (N,)
    losses = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    report = {
        "top1": metrics.topk_accuracy(logits, targets, k=1),
        "top5": metrics.topk_accuracy(logits, targets, k=5),
        "loss": losses.mean().item(),
        "n": len(targets),
        "per_class": metrics.per_class(logits, targets, classes),
        "_confusion": metrics.confusion_matrix(logits, targets),
        "_losses": losses,
        "_preds": logits.argmax(dim=1),
        "_targets": targets,
    }
    if kept is not None:
        names = ("images", "targets", "preds", "losses")
        report["_worst"] = {name: t.cpu() for name, t in zip(names, kept, strict=True)}
    return report


def _keep_worst(
    kept: tuple[torch.Tensor, ...] | None, batch: tuple[torch.Tensor, ...], count: int
) -> tuple[torch.Tensor, ...]:
    """The ``count`` highest-loss samples of ``kept`` and ``batch`` (losses last)."""
    pool = batch if kept is None else tuple(torch.cat(p) for p in zip(kept, batch, strict=True))
    order = pool[-1].topk(min(count, len(pool[-1]))).indices
    return tuple(t[order] for t in pool)


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CnnlabError(f"device {name!r}: CUDA is not available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CnnlabError(f"device {name!r}: not a valid CUDA device name") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CnnlabError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
        return device
    raise CnnlabError(f"device {name!r}: choose auto, cpu or cuda")


# ---------------------------------------------------------------------------- entry points


def train(cfg: TrainConfig, kind: type[Task] = ClassifyTask) -> dict:
    """Train into the new run folder ``cfg.out`` and return the test report.

    ``kind`` is the task class (``ClassifyTask``; cnnlab.segment and cnnlab.detect pass
    theirs). The folder receives config.yaml, split.json and model.json first, then
    metrics.csv, last.pt and best.safetensors after every epoch, and at the end report.json
    (test split, or val when there is none), curves.png and the task's own plots. Ctrl-C
    stops training and still reports on the best weights when an epoch has completed.

    Launched by torchrun as several processes, they train together (see
    ``cnnlab.distributed``) and every one of them returns the report.
    """
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise CnnlabError(f"{run_dir} is a file; --out needs a folder")
    if checkpoint.is_run_dir(run_dir):
        raise CnnlabError(f"{run_dir} already holds a run; use --resume or another --out")
    # An absolute data path keeps config.yaml and split.json valid from any directory.
    cfg, splits = kind.setup(replace(cfg, data=str(Path(cfg.data).absolute())))
    # Joining the group waits for every process, so all have checked --out before the main
    # one writes into it.
    with distributed.session(pick_device(cfg.device).type):
        run_dir.mkdir(parents=True, exist_ok=True)
        return _fit(cfg, run_dir, splits, None, kind)


def resume(run_dir: str | Path, kind: type[Task] | None = None, **overrides: Any) -> dict:
    """Continue the run in ``run_dir`` from its last completed epoch and return the report.

    Works for every task (model.json names it; with ``kind`` given, a run of another task
    is refused). Uses RUN/config.yaml and RUN/split.json
    (never re-splits) and RUN/last.pt (model, optimizer, scheduler, scaler, best, patience
    counter, RNG states, per-epoch history). ``overrides`` may change settings that do not
    define the run: device, workers, quiet (None keeps the saved value, as an unset
    command-line flag).
    """
    run_dir = checkpoint.require_run_dir(run_dir)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    allowed = {"device", "workers", "quiet"}
    if set(overrides) - allowed:
        raise CnnlabError(f"resume can only change {', '.join(sorted(allowed))}")
    task = checkpoint.read_model_json(run_dir).get("task", "classify")
    if kind is not None and task != kind.name:
        raise CnnlabError(f"{run_dir} holds a {task} run, not a {kind.name} run")
    kind = task_kind(task)
    saved = checkpoint.read_yaml(run_dir / "config.yaml")
    if not isinstance(saved, dict):
        raise CnnlabError(f"{run_dir / 'config.yaml'}: not a mapping of settings")
    cfg = TrainConfig.from_dict({**saved, **overrides, "out": str(run_dir)})
    cfg, splits = kind.reopen(cfg, checkpoint.read_json(run_dir / "split.json"))
    if not splits.root.is_dir():
        raise CnnlabError(f"{run_dir / 'split.json'}: data folder {splits.root} no longer exists")
    last = run_dir / "last.pt"
    state = checkpoint.load_state(last) if last.is_file() else None
    with distributed.session(pick_device(cfg.device).type):
        return _fit(cfg, run_dir, splits, state, kind)


# ---------------------------------------------------------------------------- the loop


def _fit(
    cfg: TrainConfig, run_dir: Path, splits: Any, state: dict | None, kind: type[Task]
) -> dict:
    ctx = distributed.context()
    main = ctx.main  # only the main process evaluates, writes the run folder and prints
    device = distributed.local_device(pick_device(cfg.device), ctx)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if not splits.val:
        raise CnnlabError(f"{cfg.data}: no validation images; raise val_split or add val/")
    _seed_everything(cfg.seed)

    # Data: the transforms follow the channels and size the model is built for.
    from cnnlab.data.transforms import default_stats

    mean, std = default_stats(cfg.in_channels)
    task = kind.for_run(cfg, splits, device)
    generator = torch.Generator()  # reseeded every epoch: shuffling is epoch-determined
    train_loader, val_data, test_data = task.loaders(cfg, splits, mean, std, generator, device, ctx)

    # Model, optimizer, schedule, mixed precision.
    model, model_args = task.build_model(cfg, pretrained=state is None)
    model.to(device)
    memory_format = torch.preserve_format
    if cuda and task.channels_last:
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    if cfg.freeze_backbone:
        transfer.freeze_backbone(model)  # before the optimizer, which takes trainable ones
    optimizer = _make_optimizer(model, cfg)
    per_step = cfg.lr_interval == "step"
    steps = len(train_loader) if per_step else 1  # scheduler steps per epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.warmup_epochs * steps, cfg.epochs * steps),
    )
    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # Where we start: a fresh run writes its description, a resumed one restores its state.
    start_epoch, best, stale, history = 0, None, 0, []
    if state is None:
        if main:
            checkpoint.write_yaml(run_dir / "config.yaml", asdict(cfg))
            checkpoint.write_json(run_dir / "split.json", splits.to_json())
            meta = _model_meta(task.name, cfg, splits.classes, model_args, mean, std)
            checkpoint.save_model_json(run_dir, meta)  # last: model.json marks a run folder
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = state["epoch"], _with_rank(state["best"], task)
        stale, history = state["epochs_without_improvement"], state["history"]
        _set_rng_state(state["rng"])
        if main:
            _sync_epoch_files(run_dir, history, best, model, task.columns)
    # Trains through the wrapper (which averages gradients over processes); saves, loads and
    # evaluates ``model`` itself, whose parameters it shares.
    net = distributed.wrap(model, device, ctx)
    step = _Step(net, task, optimizer, scaler, device, amp_dtype, cfg.grad_clip, memory_format)

    say = _Reporter(cfg.quiet or not main, task.score_label)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience is not None and stale >= cfg.patience:
                say.line(f"early stop: no better {task.best_label} for {stale} epochs")
                break
            # Each process augments its shard with its own random numbers.
            _seed_everything(cfg.seed * 1000 + epoch + _RANK_SEED_STRIDE * ctx.rank)
            generator.manual_seed(cfg.seed * 1000 + epoch)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(epoch)  # a new shuffle, the same on every rank
            model.train()
            if cfg.freeze_backbone:
                transfer.backbone_norms_eval(model)
            started = time.perf_counter()
            say.start(f"epoch {epoch + 1}/{cfg.epochs}", len(train_loader))
            seen, loss_sum, right, scored, lr = _train_epoch(
                step, train_loader, scheduler if per_step else None, say
            )
            if not per_step:
                scheduler.step()
            say.stop()
            # The whole data's numbers: sums over every process's shard.
            seen_all, loss_sum, right, scored = distributed.sum_across(
                torch.tensor(seen, device=device), loss_sum, right, scored
            )
            seen = int(seen_all.item())
            if seen == 0:
                raise CnnlabError(f"{cfg.data}: no readable training images")
            train_loss = (loss_sum / seen).item()
            if not math.isfinite(train_loss):
                raise CnnlabError(
                    f"the training loss became {train_loss} in epoch {epoch + 1};"
                    " lower the learning rate (--lr) and start again"
                )
            train_seconds = time.perf_counter() - started

            # The main process validates on the full set while the others wait.
            val = _public(task.evaluate(model, val_data, device, amp_dtype)) if main else None
            val = distributed.from_main(val)
            improved = best is None or task.rank(val) > tuple(best["rank"])
            if improved:
                best = {"rank": list(task.rank(val)), "epoch": epoch + 1}
            stale = 0 if improved else stale + 1
            train_score = right.item() / scored.item() if task.score_label else None
            history.append(
                {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": train_loss,
                    **task.history_row(train_score, val),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            # last.pt first: it is the truth a resume starts from, and it can rebuild
            # metrics.csv and best.safetensors if we die before writing them.
            if main:
                with _hold_ctrl_c():
                    checkpoint.save_state(
                        run_dir / "last.pt",
                        {
                            "epoch": epoch + 1,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "best": best,
                            "epochs_without_improvement": stale,
                            "history": history,
                            "rng": _get_rng_state(),
                        },
                    )
                    _sync_epoch_files(run_dir, history, best, model, task.columns)
            row = history[-1]
            say.line(
                f"epoch {row['epoch']}/{cfg.epochs}  {task.summary(row)}"
                f"  lr {_short_float(row['lr'])}  {seen / train_seconds:.0f} img/s"
            )
    except KeyboardInterrupt:
        if not history:
            raise CnnlabError(
                f"interrupted before the first epoch finished; {run_dir} has no weights yet"
                " (start again with --resume)"
            ) from None
        say.stop()
        say.line(f"interrupted: reporting on the best weights (epoch {best['epoch']})")
    finally:
        say.stop()  # never leave a live progress display behind an error

    # Final report on the best weights, read back from the file a user will load.
    report = None
    if main:
        checkpoint.load_weights(run_dir / "best.safetensors", model)
        split, result = task.final_evaluation(model, val_data, test_data, device, amp_dtype)
        report = {"split": split, "best_epoch": best["epoch"], **_public(result)}
        checkpoint.write_json(run_dir / "report.json", report)
        plots.plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", task.curves)
        task.write_plots(run_dir, result, mean, std)
        say.line(f"{split} {task.headline(report)}  -> {run_dir}")
    return distributed.from_main(report)


def _with_rank(best: dict, task: Task) -> dict:
    """The best-epoch record of last.pt; those written before the tasks shared this loop
    kept the validation numbers themselves ({"top1", "loss", "epoch"})."""
    if "rank" in best:
        return best
    return {"rank": list(task.rank(best)), "epoch": best["epoch"]}


@dataclass
class _Step:
    """One optimizer step on one batch, with everything it needs."""

    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    task: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float | None
    memory_format: torch.memory_format = torch.preserve_format

    def __call__(self, images: torch.Tensor, targets: Any) -> tuple[Any, torch.Tensor, Any]:
        """Forward, backward, step; returns (outputs, loss, targets) on the device."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = self.task.to_device(targets, self.device)
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            outputs, loss = self.task.forward_loss(self.net, images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return outputs, loss, targets


def _train_epoch(
    step: _Step,
    batches: Iterable[tuple[torch.Tensor, Any]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    say: _Reporter,
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
        outputs, loss, targets = step(images, targets)
        if scheduler is not None:
            scheduler.step()
        seen += len(images)
        loss_sum += loss.detach() * len(images)
        batch_score = step.task.score(outputs, targets)
        if batch_score is not None:
            right += batch_score[0]
            scored += batch_score[1]
        say.step(seen, loss_sum, right, scored)
    return seen, loss_sum, right, scored, lr


def _public(result: dict) -> dict:
    """An evaluation result without its private (plot) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a half cosine from
    1 down to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------- setup


def _resolve_model_settings(cfg: TrainConfig) -> TrainConfig:
    """Fill img_size and weight_decay, and refuse an image size the model cannot take."""
    info = model_info(cfg.model)
    if info.task != "classify":
        raise CnnlabError(f"{cfg.model} is a {info.task} model, not a classifier")
    img_size = cfg.img_size or info.input_size[1]
    # A model built for img_size (convnet) knows its own minimum; check it once built.
    if not _takes_img_size(cfg.model) and img_size < info.min_size:
        raise CnnlabError(
            f"{cfg.model} needs images of at least {info.min_size}x{info.min_size};"
            f" img_size is {img_size}"
        )
    weight_decay = cfg.weight_decay
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY[cfg.optimizer]
    return replace(cfg, img_size=img_size, weight_decay=weight_decay)


def _build_model(cfg: TrainConfig, num_classes: int, pretrained: bool) -> tuple[nn.Module, dict]:
    """The model and the full keyword arguments that rebuild it with create_model."""
    args: dict[str, Any] = {"num_classes": num_classes, "in_channels": cfg.in_channels}
    if _takes_img_size(cfg.model):
        args["img_size"] = cfg.img_size
    args.update(cfg.model_args)
    try:
        weights = (cfg.weights_file or cfg.weights) if pretrained else None
        model = create_model(cfg.model, weights=weights, **args)
    except TypeError as error:  # a model_args key the builder does not take
        raise CnnlabError(f"{cfg.model}: {error}") from None
    minimum = getattr(model, "min_input_size", 1)
    fixed = getattr(model, "fixed_input_size", None)
    if cfg.img_size < minimum:
        raise CnnlabError(
            f"{cfg.model} needs images of at least {minimum}x{minimum}; img_size is {cfg.img_size}"
        )
    if fixed is not None and tuple(fixed) != (cfg.img_size, cfg.img_size):
        raise CnnlabError(
            f"{cfg.model} takes {fixed[0]}x{fixed[1]} images; img_size is {cfg.img_size}"
        )
    return model, args


def _resolve_channels(cfg: TrainConfig, splits: Any) -> TrainConfig:
    """Fill in_channels from the training images when unset: 1 when all are grayscale."""
    if cfg.in_channels is not None:
        return cfg
    from cnnlab.data.folders import detect_in_channels

    return replace(cfg, in_channels=detect_in_channels([p for p, _ in splits.train]))


def _takes_img_size(model: str) -> bool:
    return "img_size" in inspect.signature(model_info(model).builder).parameters


def _model_meta(
    task: str, cfg: TrainConfig, classes: list[str], model_args: dict, mean, std
) -> dict:
    from cnnlab import __version__

    return {
        "task": task,
        "architecture": cfg.model,
        "model_args": model_args,
        "classes": list(classes),
        "input_size": [cfg.in_channels, cfg.img_size, cfg.img_size],
        "mean": list(mean),
        "std": list(std),
        "cnnlab_version": __version__,
    }


def _loaders(
    cfg: TrainConfig,
    splits: Any,
    mean,
    std,
    task: ClassifyTask,
    generator: torch.Generator,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """Train, val and test loaders. With several processes, each loads its own shard of
    the training split in batches of batch_size / processes (batch_size stays the number
    of images per optimizer step), and only the main one evaluates."""
    from cnnlab.data.datasets import ImageDataset
    from cnnlab.data.transforms import eval_transform, train_transform

    ctx = ctx or distributed.Context()
    size, channels = cfg.img_size, cfg.in_channels
    train_tf = train_transform(size, cfg.augment, cfg.flip, mean, std, channels)
    eval_tf = eval_transform(size, mean, std, channels)
    batch_size = _per_process_batch(cfg.batch_size, ctx.world_size)
    common = {
        "batch_size": batch_size,
        "num_workers": cfg.workers,
        "pin_memory": device.type == "cuda",
        "collate_fn": task.collate,
    }
    train_set = ImageDataset(splits.train, train_tf)
    sampler = None
    if cfg.balance == "sampler":
        if ctx.active:
            raise CnnlabError("balance=sampler needs a single process; use balance=weights")
        from cnnlab.data.datasets import balanced_sampler

        sampler = balanced_sampler(splits.train, len(splits.classes), generator)
    train = make_train_loader(train_set, cfg, generator, device, ctx, task.collate, sampler)
    # Evaluation draws no random numbers, so its workers can live across epochs. Processes
    # other than the main one never evaluate: their sets are not decoded up front.
    persistent = {"persistent_workers": cfg.workers > 0}
    cache = None if ctx.main else False
    val = DataLoader(ImageDataset(splits.val, eval_tf, cache), **common, **persistent)
    test = None
    if splits.test:
        test = DataLoader(ImageDataset(splits.test, eval_tf, cache), **common)
    return train, val, test


def make_train_loader(
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
    ctx: distributed.Context,
    collate_fn: Any,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """The training loader every task uses: shuffled by ``generator`` (or ``sampler``),
    sharded over the processes of a distributed run, batch_size / processes per process."""
    batch_size = _per_process_batch(cfg.batch_size, ctx.world_size)
    if sampler is None and ctx.active:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
    # Dropping the partial last batch (when there is a full one) avoids a batch of one,
    # which BatchNorm cannot train on; reshuffling spreads the dropped images over epochs.
    # Every process has as many images (the sampler pads), hence as many steps.
    shard = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=shard > batch_size,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_fn,
    )


def _per_process_batch(batch_size: int, processes: int) -> int:
    if batch_size % processes:
        raise CnnlabError(
            f"batch_size {batch_size} does not split evenly over {processes} processes"
            " (it counts the images of one optimizer step, over all processes)"
        )
    return batch_size // processes


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-D tensors): decaying them only hurts.
    # With a backbone_lr_mult the head's groups come first, so group 0 has the run's lr.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mult = cfg.backbone_lr_mult
    head = transfer.head_parameter_names(model) if mult != 1 else {n for n, _ in named}
    groups = [
        {
            "params": [p for n, p in named if (n in head) == in_head and (p.ndim > 1) == decay],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr": cfg.lr if in_head else cfg.lr * mult,
        }
        for in_head in (True, False)
        for decay in (True, False)
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernels update every tensor in one pass (on a CPU, AdamW's step over a
    # detector's 26M parameters drops from about 1 s to 0.1 s); they exist for these two.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    extra = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **extra)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=cfg.lr, **extra)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ---------------------------------------------------------------------------- run files


def _sync_epoch_files(
    run_dir: Path, history: list[dict], best: dict, model: nn.Module, columns: Sequence[str]
) -> None:
    """Make metrics.csv and best.safetensors agree with last.pt (already written)."""
    checkpoint.atomic_write_text(run_dir / "metrics.csv", _metrics_csv(history, columns))
    # The model holds the best weights exactly when the best epoch is the last one.
    if best["epoch"] == history[-1]["epoch"]:
        checkpoint.save_weights(
            run_dir / "best.safetensors", model, metadata={"epoch": str(best["epoch"])}
        )


def _metrics_csv(history: list[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)  # floats as repr: they read back bit-identical
    return buffer.getvalue()


@contextlib.contextmanager
def _hold_ctrl_c() -> Iterator[None]:
    """Delay Ctrl-C until the block ends, so an epoch's files are written all or none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- randomness


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state() -> dict:
    # Only tensors and plain Python values, so last.pt loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- progress


class _Reporter:
    """Per-epoch progress bar (rich, on stderr, only on a terminal) and summary lines.

    The bar reads the device-side running sums at most four times a second, so it adds
    no per-step host sync.
    """

    REFRESH_SECONDS = 0.25

    def __init__(self, quiet: bool, score_label: str | None = "top1") -> None:
        self.quiet = quiet
        self.score_label = score_label
        self.show_bar = not quiet and sys.stderr.isatty()
        self.progress = None

    def start(self, description: str, total: int) -> None:
        if not self.show_bar:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(description, total=total, stats="")
        self.steps, self.started, self.shown = 0, time.perf_counter(), 0.0

    def step(
        self, seen: int, loss_sum: torch.Tensor, right: torch.Tensor, scored: torch.Tensor
    ) -> None:
        if self.progress is None:
            return
        self.steps += 1
        now = time.perf_counter()
        if now - self.shown < self.REFRESH_SECONDS:
            return
        self.shown = now
        stats = f"loss {loss_sum.item() / seen:.3f}"
        if self.score_label:
            stats += f"  {self.score_label} {100 * right.item() / max(1, scored.item()):.1f}%"
        stats += f"  {seen / (now - self.started):.0f} img/s"
        self.progress.update(self.task_id, completed=self.steps, stats=stats)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _short_float(value: float) -> str:
    """1e-3, 2.5e-4: the way people write learning rates."""
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
