"""What classification's two modes share: ``ClassifyTask`` (one class per image,
classify.py) and ``MultiLabelClassifyTask`` (any number of labels per image, multilabel.py)
read the same split and loaders, take the same loss step and evaluation batches, and
prepare a finished run's inputs the same way; each mode adds its loss, metrics and answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from cnnlab.config import TrainConfig
from cnnlab.data.classify import (
    ImageDataset,
    MixingCollate,
    Splits,
    balanced_sampler,
    class_weights,
    collate_skip_bad,
    make_splits,
    scan_class_folders,
)
from cnnlab.data.images import detect_in_channels
from cnnlab.data.labels import Sample, as_multi_label_samples, is_label_csv, read_label_csv
from cnnlab.data.loaders import eval_loader, train_loader
from cnnlab.data.splits import SPLIT_NAMES, split_folder
from cnnlab.data.transforms import batch_mix, classify_eval, classify_train, default_stats
from cnnlab.errors import CnnlabError
from cnnlab.models.factory import model_info
from cnnlab.tasks import TASKS
from cnnlab.tasks.common import RunFacts
from cnnlab.tasks.options import Option

AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2014, section 5)
EVAL_BATCH = 64


@dataclass
class ClassifyBase(RunFacts):
    """Classification in either mode: the training side but the mode's ``loss``,
    ``right_answers``, ``evaluate`` and ``finish``, and a finished run's inputs."""

    label_smoothing: float = 0.0
    balance: str = "none"
    class_weights: torch.Tensor | None = None  # (K,) on the training device
    name: ClassVar[str] = "classify"
    options: ClassVar[tuple[Option, ...]] = TASKS["classify"].options
    channels_last: ClassVar[bool] = True
    drawings: ClassVar[tuple[str, ...]] = ("labelled",)  # what ``draw`` returns, in order
    eval_split: ClassVar[str] = TASKS["classify"].eval_split  # what `cnnlab eval RUN` reports on
    multi_label: ClassVar[bool] = False  # MultiLabelClassifyTask: sigmoid outputs, BCE

    # -- training

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, ClassifyBase]:
        """A task of this mode (``ClassifyTask.setup`` picks the mode from the data)."""
        return cls.for_splits(*training_splits(cfg, split_file))

    @classmethod
    def for_splits(cls, cfg: TrainConfig, splits: Splits) -> tuple[TrainConfig, ClassifyBase]:
        """The task of this mode training on ``splits``: channels from the images (unless
        set), the normalisation statistics of the weights it starts from."""
        in_channels = cfg.in_channels or detect_in_channels([p for p, _ in splits.train])
        cfg = replace(cfg, in_channels=in_channels)
        mean, std = default_stats(in_channels, pretrained=cfg.weights is not None)
        task = cls(
            splits.classes,
            in_channels,
            cfg.img_size,
            mean,
            std,
            splits,
            cfg.label_smoothing,
            cfg.balance,
        )
        return cfg, task

    def loaders(
        self,
        cfg: TrainConfig,
        generator: torch.Generator,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[DataLoader, DataLoader, DataLoader | None]:
        """Train, val and test loaders; only the main process (rank 0) decodes val and
        test up front, since only it evaluates."""
        splits, k = self.splits, len(self.classes)
        train_tf = classify_train(self.img_size, cfg.augment, cfg.flip, self.mean, self.std)
        eval_tf = classify_eval(self.img_size, self.mean, self.std)
        pin = device.type == "cuda"
        sampler = None
        if self.balance == "sampler":
            if world_size > 1:
                raise CnnlabError("balance=sampler needs a single process; use balance=weights")
            sampler = balanced_sampler(splits.train, k, generator)
        elif self.balance == "weights":
            self.class_weights = class_weights(splits.train, k).to(device)
        mix = batch_mix(cfg.mixup, cfg.cutmix, k)
        train = train_loader(
            ImageDataset(self.encode(splits.train), train_tf, self.in_channels),
            cfg.batch_size,
            generator,
            collate_skip_bad if mix is None else MixingCollate(mix),
            workers=cfg.workers,
            pin_memory=pin,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
            sampler=sampler,
        )
        cache = None if rank == 0 else False
        common = {"workers": cfg.workers, "pin_memory": pin}

        def evaluation(samples: list[Sample], persistent: bool) -> DataLoader:
            dataset = ImageDataset(self.encode(samples), eval_tf, self.in_channels, cache)
            return eval_loader(
                dataset, train.batch_size, collate_skip_bad, persistent=persistent, **common
            )

        test = evaluation(splits.test, False) if splits.test else None
        return train, evaluation(splits.val, True), test

    def forward_loss(
        self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        """Cross-entropy of the logits (B, K) and the batch's right answers. A model with
        auxiliary classifiers (GoogLeNet with ``aux_logits``) returns them in training;
        they add 0.3 x their losses, the paper's weight, and only the main logits score.
        MixUp/CutMix targets are soft (B, K): an answer is right when it names the class
        with the larger share."""
        outputs = net(images)
        if isinstance(outputs, tuple):
            outputs, *auxiliary = outputs
            loss = self.loss(outputs, targets)
            loss = loss + AUX_LOSS_WEIGHT * sum(self.loss(aux, targets) for aux in auxiliary)
        else:
            loss = self.loss(outputs, targets)
        return loss, (self.right_answers(outputs, targets), len(targets))

    # -- a finished run

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """The model's float input (C, S, S) for a uint8 image (in_channels, H, W), as
        ``predict`` and evaluation make it."""
        return classify_eval(self.img_size, self.mean, self.std)(image)

    def split_images(self, split_file: Path, split: str) -> list[Path]:
        """The image files of the run's own ``split``."""
        return [path for path, _ in getattr(Splits.from_json(split_file), split)]

    def eval_data(self, split_file: Path, data_dir: Path | None, split: str) -> DataLoader:
        """The run's own ``split`` (from its ``split_file``) or, with
        ``data_dir``, ``DATA/<split>`` when that folder exists, else the whole class-folder
        tree; its classes may be a subset of the run's, matched by name."""
        if data_dir is None:
            samples = self._own_split(split_file, split)
        elif is_label_csv(data_dir):
            _, classes, samples = read_label_csv(Path(data_dir), multi_label=self.multi_label)
            samples = self._remap(classes, samples, Path(data_dir))
        else:
            root = split_folder(Path(data_dir), split)
            classes, samples = scan_class_folders(root)
            samples = self._remap(classes, samples, root)
        dataset = ImageDataset(
            self.encode(samples),
            classify_eval(self.img_size, self.mean, self.std),
            self.in_channels,
        )
        return eval_loader(dataset, EVAL_BATCH, collate_skip_bad)

    def encode(self, samples: list[Sample]) -> list[Sample]:
        """The samples as the dataset gives them to the model: class indices as they are
        (multi-label: a multi-hot vector)."""
        return samples

    def _own_split(self, split_file: Path, split: str) -> list[Sample]:
        if split not in SPLIT_NAMES:
            raise CnnlabError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
        splits = Splits.from_json(split_file)
        samples = getattr(splits, split)
        if not samples:
            raise CnnlabError(
                f"{split_file}: the run has no {split} images; pass a data folder instead"
            )
        return self._remap(splits.classes, samples, split_file)

    def _remap(self, classes: list[str], samples: list[Sample], source: Path) -> list[Sample]:
        """Relabel samples from ``classes`` indices to the model's, by class name."""
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in classes if name not in index]
        if unknown:
            raise CnnlabError(
                f"{source}: class folder {unknown[0]!r} is not one of the run's"
                f" {len(self.classes)} classes"
            )
        if self.multi_label:
            return [
                (path, tuple(sorted(index[classes[one]] for one in labels)))
                for path, labels in as_multi_label_samples(samples)
            ]
        return [(path, index[classes[label]]) for path, label in samples]


def training_splits(cfg: TrainConfig, split_file: Path | None = None) -> tuple[TrainConfig, Splits]:
    """``cfg`` with the image size the model takes, and the stratified split (the one saved
    in ``split_file`` when given; else ``cfg.images`` made absolute, as config.yaml keeps
    it). A size the model cannot take is refused before any data is read."""
    info = model_info(cfg.model)
    img_size = cfg.img_size or info.input_size[1]
    # Refuse a size the model cannot take before reading any data (a model built for
    # img_size, the ConvNet, checks its own minimum once built).
    if not info.takes_img_size and img_size < info.min_size:
        raise CnnlabError(
            f"{cfg.model} needs images of at least {info.min_size}x{info.min_size};"
            f" img_size is {img_size}"
        )
    cfg = replace(cfg, img_size=img_size)
    if split_file is not None:
        return cfg, Splits.from_json(split_file)
    images = Path(cfg.images).absolute() if cfg.images else None
    cfg = replace(cfg, images=str(images) if images else None)
    splits = make_splits(
        Path(cfg.data), cfg.val_split, cfg.test_split, cfg.seed, images, cfg.multi_label
    )
    return cfg, splits


def logits_batches(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, targets, float logits (B, K)) of each non-empty batch of ``loader`` on
    ``device`` (model put in eval mode), under ``autocast_dtype`` when given: the one
    evaluation loop of single- and multi-label classification. Call it under
    ``torch.inference_mode()``."""
    model.eval()
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    for images, targets in loader:  # (B, C, S, S), (B,) or (B, K)
        if len(targets) == 0:
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images).float()
        yield images, targets, logits  # outside autocast: the caller's losses in float
