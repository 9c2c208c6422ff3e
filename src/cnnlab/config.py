"""``TrainConfig``: everything that defines a training run, for every task.

The dataclass is the one description of a run's settings: ``train`` reads it, each run
saves it (resolved) as ``RUN/config.yaml``, and the command line's training flags are
generated from its fields (help and choices live in each field's metadata). Where the
tasks differ only in defaults (a detector trains 30 epochs with a looser gradient clip),
the task's entry in ``cnnlab.tasks.TASKS`` says so and ``make_config`` applies them; a
value the user gives always wins.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from cnnlab.errors import CnnlabError
from cnnlab.tasks import entry

# trivial and randaugment: torchvision's TrivialAugmentWide and RandAugment policies after the
# light crop (classification only; see cnnlab.data.transforms).
AUGMENTS = ("none", "light", "strong", "trivial", "randaugment")
# The recipes the other tasks' joint (image, mask / boxes) transforms have (the same lists
# as cnnlab.data.transforms' segment_train and detect_train check).
TASK_AUGMENTS = {"segment": ("none", "light", "strong"), "detect": ("none", "light")}
OPTIMIZERS = ("adam", "adamw", "sgd")
# AdamW's decoupled decay wants a much larger value than SGD's L2 penalty (timm's defaults).
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.05, "sgd": 5e-4}
# torch.compile for training, prediction and evaluation (cnnlab.compiling; docs/speed.md).
COMPILE_SETTINGS = ("auto", "on", "off")


def _setting(
    default: Any,
    help: str,
    choices: tuple | None = None,
    cli: bool = True,
    tasks: tuple[str, ...] | None = None,
    instead: dict[str, str] | None = None,
    task_choices: dict[str, tuple] | None = None,
) -> Any:
    """A field with the command line's help text (and choices); ``cli=False`` keeps it off
    the command line (filled in by the run, or given another way); ``tasks`` names the only
    tasks whose train command takes it as a flag (None: every task's), ``instead`` what
    another task takes in its place (its refusals say so), ``task_choices`` the fewer
    choices a task has (``choices_of``)."""
    metadata = {"help": help, "choices": choices, "cli": cli, "tasks": tasks}
    metadata |= {"instead": instead or {}, "task_choices": task_choices or {}}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved (resolved) as RUN/config.yaml."""

    data: str = field(metadata={"help": "the data folder", "cli": False})
    out: str = field(metadata={"help": "the run folder to create", "cli": False})
    model: str = _setting("resnet18", "registered model name (`cnnlab models`)")
    # Extra builder arguments, e.g. {"cdims": [32, 64]}; on the command line any builder
    # argument passes through as a flag (--cdims 32,64, --backbone resnet18).
    model_args: dict = field(
        default_factory=dict, metadata={"help": "extra builder arguments", "cli": False}
    )
    # A detector starts from a zoo model's weights through its backbone (the model argument
    # backbone_weights); whole-model files and the head-only recipes need a classifier head
    # (transfer.head_parameter_names), which no segmentation or detection model names.
    weights: str | None = _setting(
        None,
        "initial weights: a .pth/.safetensors file, or torchvision (from the torch cache)",
        tasks=("classify", "segment"),
        instead={"detect": "a detector's backbone takes the model flag --backbone-weights FILE"},
    )
    weights_file: str | None = _setting(None, "filled in: the weight file read", cli=False)
    weights_sha256: str | None = _setting(None, "filled in: its SHA-256", cli=False)
    freeze_backbone: bool = _setting(
        False,
        "train the classifier head only (backbone BatchNorm statistics frozen too)",
        tasks=("classify",),
    )
    backbone_lr_mult: float = _setting(
        1.0, "backbone learning rate = lr x this; the head: lr", tasks=("classify",)
    )
    epochs: int = _setting(10, "passes over the training split")
    batch_size: int = _setting(
        64, "images per optimizer step; under torchrun, over all processes together"
    )
    lr: float = _setting(1e-3, "peak learning rate, reached at the end of warm-up")
    optimizer: str = _setting("adamw", "sgd: momentum 0.9, Nesterov", OPTIMIZERS)
    weight_decay: float | None = _setting(
        None, "none: 0.05 adamw, 5e-4 sgd, 0 adam; never on norms and biases"
    )
    warmup_epochs: int = _setting(1, "linear warm-up length, then cosine decay to 0")
    lr_interval: str = _setting(
        "step", "the schedule advances every step or epoch", ("step", "epoch")
    )
    grad_clip: float | None = _setting(1.0, "max global gradient norm; none: no clipping")
    img_size: int | None = _setting(
        None, "square input side (segmentation: the training crop); none: the model's own"
    )
    in_channels: int | None = _setting(
        None, "none: 1 when every sampled image is grayscale, else 3", (1, 3)
    )
    augment: str = _setting("light", "training augmentation", AUGMENTS, task_choices=TASK_AUGMENTS)
    flip: bool = _setting(True, "random horizontal flips (--no-flip for digits, text)")
    label_smoothing: float = _setting(
        0.0, "cross-entropy label smoothing for training", tasks=("classify",)
    )
    mixup: float = _setting(
        0.0, "MixUp alpha for training batches (timm: 0.8); 0: off", tasks=("classify",)
    )
    cutmix: float = _setting(
        0.0,
        "CutMix alpha (timm: 1.0); 0: off; with mixup each batch takes one of the two",
        tasks=("classify",),
    )
    ema: float | None = _setting(
        None,
        "decay of a moving average of the weights (timm: 0.9998), warmed up as timm's; the"
        " average is what is evaluated and saved",
    )
    patience: int | None = _setting(
        None, "stop after this many epochs without a better best (early stopping)"
    )
    min_delta: float = _setting(
        0.0,
        "with patience: the gain in the first ranked validation figure (top-1, mIoU, mAP)"
        " that counts as better; smaller gains still update the best weights",
    )
    images: str | None = _setting(
        None,
        "with a CSV file as DIR (columns file,label): the folder its file names are relative"
        " to; none: the CSV's folder",
        tasks=("classify",),
    )
    multi_label: bool = _setting(
        False,
        "classification: several labels per image (sigmoid outputs, binary cross-entropy,"
        " per-label thresholds); on by itself when a CSV label cell holds labels split by ';'",
        tasks=("classify",),
    )
    split_file: str | None = _setting(
        None,
        "train on the split of this split.json (a run's, or a fold of `cnnlab cv`) instead"
        " of splitting the data",
    )
    val_split: float = _setting(0.1, "fraction held out for validation (unless DIR/val exists)")
    # Segmentation and detection split train/val only: their validation split reports.
    test_split: float = _setting(
        0.1, "fraction held out for testing (unless DIR/test exists)", tasks=("classify",)
    )
    balance: str = _setting(
        "none",
        "weights: weighted loss; sampler: balanced batches",
        ("none", "weights", "sampler"),
        tasks=("classify",),
    )
    amp: str = _setting(
        "auto", "CUDA mixed precision (auto: bf16, else fp16)", ("auto", "bf16", "fp16", "off")
    )
    seed: int = _setting(0, "split, initialisation, shuffling and augmentation")
    device: str = _setting("auto", "auto (CUDA when available) | cpu | cuda | cuda:N")
    threads: int | None = _setting(
        None, "torch threads; none: the free cores now (cnnlab.device.cpu_plan)"
    )
    workers: int | None = _setting(
        None, "DataLoader worker processes; none: 0 on a CPU with few free cores (cpu_plan)"
    )
    compile: str = _setting(
        "auto",
        "torch.compile the model for training (inductor); auto: only where it wins back its"
        " compile time, which on a CPU it never did (docs/speed.md); a model that fails to"
        " compile trains eagerly",
        COMPILE_SETTINGS,
    )
    quiet: bool = _setting(False, "no progress bar and no per-epoch line")
    resolved: dict = field(
        default_factory=dict,
        metadata={
            "help": "filled in: the device, torch threads and loader workers the run started"
            " with (cnnlab.engine.prepare.resolve), and under torchrun its job id",
            "cli": False,
        },
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            allowed = item.metadata.get("choices")
            value = getattr(self, item.name)
            if allowed and value is not None and value not in allowed:
                listed = ", ".join(map(str, allowed))
                raise CnnlabError(f"{item.name} must be one of {listed}, got {value!r}")
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number")
        _require(
            self.weight_decay is None or 0 <= self.weight_decay < math.inf,
            "weight_decay must be 0 or more",
        )
        _require(self.warmup_epochs >= 0, "warmup_epochs must be 0 or more")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive")
        _require(self.img_size is None or self.img_size >= 1, "img_size must be positive")
        _require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        for name in ("mixup", "cutmix"):
            value = getattr(self, name)
            _require(0 <= value < math.inf, f"{name} must be 0 (off) or a positive alpha")
        _require(self.ema is None or 0 < self.ema < 1, "ema must be a decay between 0 and 1")
        _require(self.patience is None or self.patience >= 1, "patience must be at least 1")
        _require(0 <= self.min_delta < math.inf, "min_delta must be 0 or more")
        _require(0 <= self.val_split < 1, "val_split must be in [0, 1)")
        _require(0 <= self.test_split < 1, "test_split must be in [0, 1)")
        _require(self.val_split + self.test_split < 1, "val_split + test_split must be below 1")
        _require(self.threads is None or self.threads >= 1, "threads must be at least 1")
        _require(self.workers is None or self.workers >= 0, "workers must be 0 or more")
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
        missing = [f.name for f in fields(cls) if f.name not in data and _required(f)]
        if missing:
            raise CnnlabError(f"missing config key {missing[0]!r}")
        for key, value in data.items():
            if not has_type(value, hints[key]):
                raise CnnlabError(f"config key {key!r}: {value!r} is not a {hints[key]}")
        return cls(**data)


def _required(item: Field) -> bool:
    return item.default is MISSING and item.default_factory is MISSING


def make_config(task: str, **values: Any) -> TrainConfig:
    """A TrainConfig with ``task``'s defaults under ``values`` (model_args merge key by key;
    None means "not given", as an unset command-line flag)."""
    defaults = entry(task).defaults
    given = {key: value for key, value in values.items() if value is not None}
    model_args = {**defaults.get("model_args", {}), **given.pop("model_args", {})}
    return TrainConfig.from_dict({**defaults, **given, "model_args": model_args})


def default_of(task: str, name: str) -> Any:
    """What ``make_config(task)`` sets ``name`` to when it is not given."""
    defaults = entry(task).defaults
    if name in defaults:
        return defaults[name]
    item = next(f for f in fields(TrainConfig) if f.name == name)
    return item.default_factory() if callable(item.default_factory) else item.default


def choices_of(task: str, name: str) -> tuple | None:
    """The values field ``name`` may take in a ``task`` run (None: any of its type)."""
    item = next(f for f in fields(TrainConfig) if f.name == name)
    return item.metadata.get("task_choices", {}).get(task, item.metadata.get("choices"))


def check_task_settings(cfg: TrainConfig, task: str) -> None:
    """A CnnlabError naming every setting of ``cfg`` that only other tasks take (a field's
    ``tasks``: the same declaration that keeps the flag off ``task``'s train command) and
    that is set away from the defaults, and what ``task`` takes instead (``instead``);
    and a value outside the choices ``task`` has (``choices_of``)."""
    # TrainConfig's own default passes too: a config built without make_config (a test
    # split of 0.1 in a segmentation run) holds it unasked.
    given = [
        item
        for item in fields(TrainConfig)
        if item.metadata.get("tasks") is not None
        and task not in item.metadata["tasks"]
        and getattr(cfg, item.name) not in (default_of(task, item.name), item.default)
    ]
    if given:
        whose = "it is another task's setting" if len(given) == 1 else "they are other tasks'"
        hints = [
            item.metadata["instead"][task] for item in given if task in item.metadata["instead"]
        ]
        named = ", ".join(item.name for item in given)
        raise CnnlabError(f"a {task} run does not take {named}: {'; '.join([whose, *hints])}")
    for item in fields(TrainConfig):
        allowed, value = choices_of(task, item.name), getattr(cfg, item.name)
        if allowed and value is not None and value not in allowed:
            listed = ", ".join(map(str, allowed))
            raise CnnlabError(f"{item.name} of a {task} run must be one of {listed}, got {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CnnlabError(message)


def has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML or JSON) fits the type hint: an int is a float, a bool
    is no int, None fits an Optional."""
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
