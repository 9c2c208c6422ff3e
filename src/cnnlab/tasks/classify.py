"""Image classification: cross-entropy, top-1/top-5, best checkpoint by val top-1; top-k
prediction and the test report of a finished run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cnnlab import metrics, plots
from cnnlab.checkpoint import ModelMeta, read_model_json, save_model_json
from cnnlab.config import TrainConfig
from cnnlab.data.classify import (
    ImageDataset,
    MixingCollate,
    Sample,
    Splits,
    as_multi_label,
    as_multi_label_samples,
    balanced_sampler,
    class_weights,
    collate_skip_bad,
    is_label_csv,
    make_splits,
    multi_hot,
    read_label_csv,
    scan_class_folders,
)
from cnnlab.data.images import detect_in_channels
from cnnlab.data.loaders import eval_loader, train_loader
from cnnlab.data.splits import SPLIT_NAMES, split_folder
from cnnlab.data.transforms import batch_mix, classify_eval, classify_train, default_stats
from cnnlab.errors import CnnlabError
from cnnlab.files import read_yaml
from cnnlab.models.factory import model_info
from cnnlab.tasks import TASKS
from cnnlab.tasks.common import RunFacts, chunks, measured_on, per_class_line
from cnnlab.tasks.options import Option
from cnnlab.tasks.spec import Figure, MetricSpec
from cnnlab.tasks.tta import TTA

TTA_ZOOM = 0.9  # the centre part TTA enlarges: inside every training crop's scale range
AUX_LOSS_WEIGHT = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2014, section 5)
WORST_IMAGES = 16  # highest-loss test images kept for errors.png
EVAL_BATCH = 64


@dataclass
class ClassifyTask(RunFacts):
    """Classification for the training loop (``cnnlab.engine.task.TrainingTask``) and for a
    finished run (``cnnlab.tasks.inference.InferenceTask``)."""

    label_smoothing: float = 0.0
    balance: str = "none"
    class_weights: torch.Tensor | None = None  # (K,) on the training device
    name: ClassVar[str] = "classify"
    options: ClassVar[tuple[Option, ...]] = TASKS["classify"].options
    metrics: ClassVar[MetricSpec] = MetricSpec(
        val=(Figure("loss", "loss"), Figure("top1", "top1", True), Figure("top5", "top5", True)),
        # Higher is better: val top-1, then (on a tie) the lower val loss.
        best=("top1", "-loss"),
        best_label="val top-1",
        curves={
            "loss": ("train_loss", "val_loss"),
            "top-1 accuracy": ("train_top1", "val_top1"),
        },
        in_line=("loss", "top1"),
        train=Figure("top1", "top1", True),
    )
    channels_last: ClassVar[bool] = True
    drawings: ClassVar[tuple[str, ...]] = ("labelled",)  # what ``draw`` returns, in order
    csv_columns: ClassVar[tuple[str, ...]] = ("file", "rank", "class", "prob")  # --save-csv
    eval_split: ClassVar[str] = TASKS["classify"].eval_split  # what `cnnlab eval RUN` reports on
    exported_logits: ClassVar[str | None] = "images"  # export: (N, K), one row per image
    multi_label: ClassVar[bool] = False  # MultiLabelClassifyTask: sigmoid outputs, BCE

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> ClassifyTask:
        """The task of a finished run: the multi-label variant, with its fitted thresholds,
        when model.json records thresholds."""
        channels, size, _ = meta.input_size
        facts = (list(meta.classes), channels, size, tuple(meta.mean), tuple(meta.std))
        if meta.thresholds is None:
            return cls(*facts)
        return MultiLabelClassifyTask(*facts, thresholds=list(meta.thresholds))

    # -- training

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, ClassifyTask]:
        """Image size from the model, the stratified split, channels from the images."""
        info = model_info(cfg.model)
        img_size = cfg.img_size or info.input_size[1]
        # Refuse a size the model cannot take before reading any data (a model built for
        # img_size, the ConvNet, checks its own minimum once built).
        if not info.takes_img_size and img_size < info.min_size:
            raise CnnlabError(
                f"{cfg.model} needs images of at least {info.min_size}x{info.min_size};"
                f" img_size is {img_size}"
            )
        if split_file is None:
            images = Path(cfg.images).absolute() if cfg.images else None
            cfg = replace(cfg, images=str(images) if images else None)
            splits = make_splits(
                Path(cfg.data), cfg.val_split, cfg.test_split, cfg.seed, images, cfg.multi_label
            )
        else:
            splits = Splits.from_json(split_file)
        variant = cls
        if cfg.multi_label or splits.multi_label:
            variant = MultiLabelClassifyTask
            splits = as_multi_label(splits)
            refused = [
                f"--{name.replace('_', '-')}"
                for name, on in (
                    ("balance", cfg.balance != "none"),
                    ("mixup", cfg.mixup > 0),
                    ("cutmix", cfg.cutmix > 0),
                    ("label_smoothing", cfg.label_smoothing > 0),
                )
                if on
            ]
            if refused:
                raise CnnlabError(
                    f"multi-label classification takes no {', '.join(refused)}"
                    " (they assume one class per image)"
                )
        in_channels = cfg.in_channels or detect_in_channels([p for p, _ in splits.train])
        cfg = replace(cfg, img_size=img_size, in_channels=in_channels)
        mean, std = default_stats(in_channels, pretrained=cfg.weights is not None)
        task = variant(
            splits.classes,
            in_channels,
            img_size,
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

    @staticmethod
    def right_answers(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many of the batch's logits (B, K) name the target's class (for a soft target,
        the class with the larger share)."""
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        return (logits.argmax(dim=1) == labels).sum()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training objective; logits (B, K), targets (B,) class indices or (B, K) class
        probabilities (mixed batches)."""
        return F.cross_entropy(
            logits, targets, weight=self.class_weights, label_smoothing=self.label_smoothing
        )

    def evaluate(
        self,
        model: nn.Module,
        data: DataLoader,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        worst: int = 0,
    ) -> dict:
        """See ``evaluate``."""
        return evaluate(model, data, device, self.classes, autocast_dtype, worst)

    def finish(
        self,
        model: nn.Module,
        val: DataLoader,
        test: DataLoader | None,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        run_dir: Path,
    ) -> tuple[str, dict]:
        """The test split (val when there is none), confusion.png and errors.png."""
        split, loader = ("test", test) if test is not None else ("val", val)
        result = self.evaluate(model, loader, device, autocast_dtype, worst=WORST_IMAGES)
        plots.plot_confusion(result["_confusion"], self.classes, run_dir / "confusion.png")
        worst = result["_worst"]
        plots.plot_errors(
            list(worst["images"]),
            [self.classes[i] for i in worst["targets"].tolist()],
            [self.classes[i] for i in worst["preds"].tolist()],
            worst["probs"].tolist(),
            worst["losses"].tolist(),
            run_dir / "errors.png",
            self.mean,
            self.std,
            heats=_gradcam(model, worst["images"], worst["preds"], device),
        )
        return split, result

    @staticmethod
    def headline(report: dict) -> str:
        """With five classes or fewer, top-5 is always 100% and is left out. (The CLI
        calls it on the task class of model.json's "task": a multi-label report, which has
        an exact-match ratio, is the multi-label variant's.)"""
        if "exact_match" in report:
            return MultiLabelClassifyTask.headline(report)
        top5 = f"  top-5 {report['top5']:.2%}" if len(report["per_class"]) > 5 else ""
        return (
            f"{measured_on(report)} top-1 {report['top1']:.2%}{top5}  loss {report['loss']:.4f}"
            f"  ({report['n']} images)"
        )

    def batch_pictures(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> list[tuple[torch.Tensor, str]]:
        """(uint8 image, its label) for each image of a training batch, as batch.png shows
        them; a mixed image names its two classes and their shares."""
        from cnnlab.draw import unnormalise

        def caption(label: torch.Tensor) -> str:
            if label.ndim == 0:
                return self.classes[int(label)]
            shares, indices = label.topk(min(2, len(label)))
            named = zip(indices.tolist(), shares.tolist(), strict=True)
            return " + ".join(f"{self.classes[i]} {p:.2f}" for i, p in named if p >= 0.005)

        return [
            (unnormalise(image, self.mean, self.std), caption(label))
            for image, label in zip(images, targets, strict=False)
        ]

    @staticmethod
    def details(report: dict) -> list[str]:
        """What follows the headline: precision, recall, F1 and support of each class (the
        ``PER_CLASS_SHOWN`` lowest F1 when there are more classes) and the most frequent
        mistakes."""
        if "exact_match" in report:
            return MultiLabelClassifyTask.details(report)
        lines = per_class_lines(report.get("per_class") or {})
        mistakes = report.get("most_confused") or []
        if mistakes:
            import textwrap

            from cnnlab.tables import terminal_width

            shown = ", ".join(f"{m['true']} as {m['pred']} ({m['count']})" for m in mistakes[:5])
            lines += textwrap.wrap(
                f"most confused (true as predicted): {shown}",
                terminal_width(),
                subsequent_indent="  ",
                break_long_words=False,
            )
        return lines

    # -- a finished run

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, images: list[torch.Tensor], device: torch.device, topk: int = 5
    ) -> list[dict]:
        """``[{"top": [{"class", "prob"}, ...]}]`` per uint8 image (in_channels, H, W),
        preprocessed as evaluation was (resize, centre crop, normalisation)."""
        k = min(topk, len(self.classes))
        results = []
        for chunk in chunks(images, EVAL_BATCH):
            batch = torch.stack([self.preprocess(image) for image in chunk]).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            probs = model(batch).float().softmax(dim=1)  # (B, K)
            top_probs, top_indices = probs.topk(k, dim=1)  # (B, k), sorted descending
            for values, indices in zip(top_probs.tolist(), top_indices.tolist(), strict=True):
                top = [
                    {"class": self.classes[i], "prob": p}
                    for i, p in zip(indices, values, strict=True)
                ]
                results.append({"top": top})
        return results

    def test_time_augmented(self, model: nn.Module, config_file: Path) -> nn.Module:
        """``model`` wrapped in ``TTA`` with the views the run trained on, read from its
        config.yaml: the mirror image when it trained with flips, a zoom when with crops."""
        saved = read_yaml(config_file)
        if not isinstance(saved, dict):
            raise CnnlabError(f"{config_file}: not a mapping of settings")
        mirror, zoom = saved.get("flip", True), saved.get("augment", "light") != "none"
        if not (mirror or zoom):
            raise CnnlabError(
                f"{config_file}: the run trained without flips or crops; --tta has no view"
                " it has seen to add"
            )
        return TTA(model, mirror, TTA_ZOOM if zoom else None)

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

    @staticmethod
    def describe(result: dict) -> str:
        return ", ".join(f"{t['class']} {t['prob']:.1%}" for t in result["top"])

    @staticmethod
    def csv_rows(result: dict) -> list[tuple]:
        """One row per listed class, in ``csv_columns`` order (rank 1 the top class)."""
        return [
            (result["file"], rank, top["class"], top["prob"])
            for rank, top in enumerate(result["top"], start=1)
        ]

    @staticmethod
    def draw(image: torch.Tensor, result: dict) -> dict[str, bytes]:
        """PNGs to save, by name: the image with its top class and probability written
        above it (``cnnlab.draw``)."""
        from cnnlab.draw import caption, encode_png

        best = result["top"][0]
        return {"labelled": encode_png(caption(image, f"{best['class']} {best['prob']:.0%}"))}


TASK = ClassifyTask


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


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    classes: list[str],
    autocast_dtype: torch.dtype | None = None,
    worst: int = 0,
) -> dict:
    """Classification metrics of ``model`` over ``loader`` (model left in eval mode).

    Returns ``{"top1", "top5", "loss", "n", "per_class": {name: {"precision", "recall",
    "f1", "support"}}, "most_confused": [{"true", "pred", "count"}]}`` (accuracies as
    fractions, top5 meaning top-min(5, K), loss the plain mean cross-entropy) plus, for
    plots, ``_confusion`` (K, K) and, when ``worst`` > 0, ``_worst``: the misclassified
    samples first, then the highest-loss ones, ``worst`` in all, as ``{"images",
    "targets", "preds", "probs", "losses"}`` CPU tensors (``probs``: of the predicted
    class).
    """
    all_logits, all_targets = [], []
    kept: tuple[torch.Tensor, ...] | None = None  # (images, targets, preds, losses)
    for images, targets, logits in logits_batches(model, loader, device, autocast_dtype):
        all_logits.append(logits)
        all_targets.append(targets)
        if worst:
            losses = F.cross_entropy(logits, targets, reduction="none")  # (B,)
            probs, preds = logits.softmax(dim=1).max(dim=1)  # (B,), (B,)
            kept = _keep_worst(kept, (images, targets, preds, probs, losses), worst)
    if not all_logits:
        raise CnnlabError("no readable images to evaluate")
    logits = torch.cat(all_logits).cpu()  # (N, K)
    targets = torch.cat(all_targets).cpu()  # (N,)
    report: dict[str, Any] = {
        "top1": metrics.topk_accuracy(logits, targets, k=1),
        "top5": metrics.topk_accuracy(logits, targets, k=5),
        "loss": F.cross_entropy(logits, targets, reduction="none").mean().item(),
        "n": len(targets),
        "per_class": metrics.per_class(logits, targets, classes),
        "_confusion": metrics.confusion_matrix(logits, targets),
    }
    report["most_confused"] = metrics.most_confused(report["_confusion"], classes)
    if kept is not None:
        names = ("images", "targets", "preds", "probs", "losses")
        report["_worst"] = {name: t.cpu() for name, t in zip(names, kept, strict=True)}
    return report


def _gradcam(
    model: nn.Module, images: torch.Tensor, preds: torch.Tensor, device: torch.device
) -> list[torch.Tensor] | None:
    """Grad-CAM of each image's predicted class at the registry's explain layer, for
    errors.png (None for a model the registry names no such layer of, or no images)."""
    from cnnlab.attribution.maps import attribute, class_scores
    from cnnlab.registry import info_of

    info = info_of(model)
    if info is None or info.explain_layer is None or not len(images):
        return None
    model.eval()
    x = images.clone().to(device)  # evaluation kept inference tensors, which take no grad
    return list(attribute(model, x, class_scores(preds), "gradcam", info.explain_layer).cpu())


def _keep_worst(
    kept: tuple[torch.Tensor, ...] | None, batch: tuple[torch.Tensor, ...], count: int
) -> tuple[torch.Tensor, ...]:
    """The ``count`` samples of ``kept`` and ``batch`` to show as errors: the misclassified
    first, then by loss (tensors: images, targets, preds, probs, losses)."""
    pool = batch if kept is None else tuple(torch.cat(p) for p in zip(kept, batch, strict=True))
    targets, preds, losses = pool[1], pool[2], pool[-1]
    # Any wrong answer outranks every right one; the loss orders within each group.
    wrong = (preds != targets).to(losses.dtype)
    order = (losses + wrong * (losses.max() + 1)).topk(min(count, len(losses))).indices
    return tuple(t[order] for t in pool)


PER_CLASS_SHOWN = 15  # more classes: the lowest F1 first, the rest in --format json


def per_class_lines(per_class: dict[str, dict], width: int | None = None) -> list[str]:
    """The per-class table as text lines within ``width`` (default: the terminal's, 80 when
    piped): every class in its folder order, or the ``PER_CLASS_SHOWN`` with the lowest F1
    (the ones to look at) and a line saying so."""
    from cnnlab.tables import Column, fit_table, render_plain, terminal_width

    if not per_class:
        return []
    names = list(per_class)
    note = ""
    if len(names) > PER_CLASS_SHOWN:
        names = sorted(names, key=lambda n: (per_class[n]["f1"], n))[:PER_CLASS_SHOWN]
        note = (
            f"the {PER_CLASS_SHOWN} classes of {len(per_class)} with the lowest F1;"
            " every class in --format json"
        )
    columns = (Column("class", "left"), Column("precision"), Column("recall"), Column("F1"),
               Column("support"))  # fmt: skip
    rows = [
        (
            name,
            f"{per_class[name]['precision']:.3f}",
            f"{per_class[name]['recall']:.3f}",
            f"{per_class[name]['f1']:.3f}",
            f"{int(per_class[name]['support']):,}",
        )
        for name in names
    ]
    table = fit_table("per class", columns, rows, width or terminal_width())
    return [*render_plain(table).splitlines(), *([note] if note else [])]


@dataclass
class MultiLabelClassifyTask(ClassifyTask):
    """Multi-label classification, a mode of ``ClassifyTask`` (``--multi-label``, or a label
    CSV whose cells hold several labels): one sigmoid score per label, binary cross-entropy,
    the best checkpoint by val mAP; after training each label's threshold is fitted on the
    validation split (``metrics.fit_thresholds``) and saved in model.json."""

    thresholds: list[float] | None = None  # per label; None: 0.5 each (not yet fitted)
    multi_label: ClassVar[bool] = True
    metrics: ClassVar[MetricSpec] = MetricSpec(
        val=(
            Figure("loss", "loss"),
            Figure("map", "mAP"),
            Figure("f1", "F1"),
            Figure("exact_match", "exact", True),
        ),
        # Higher is better: val mAP, then (on a tie) the lower val loss.
        best=("map", "-loss"),
        best_label="val mAP",
        curves={
            "loss": ("train_loss", "val_loss"),
            "mAP / F1": {"val_map": "val mAP", "val_f1": "val F1"},
            "exact match": ("train_exact_match", "val_exact_match"),
        },
        in_line=("loss", "map", "exact_match"),
        train=Figure("exact_match", "exact", True),
    )
    csv_columns: ClassVar[tuple[str, ...]] = ("file", "rank", "class", "prob", "threshold")
    # export: (N, K) logits whose sigmoid each label's threshold decides (model.json's)
    exported_logits: ClassVar[str | None] = "labels"

    def encode(self, samples: list[Sample]) -> list[Sample]:
        k = len(self.classes)
        return [(path, multi_hot(labels, k)) for path, labels in as_multi_label_samples(samples)]

    @staticmethod
    def right_answers(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many of the batch's images have every label right at 0.5 (exact matches):
        ``forward_loss`` is the parent's, with binary cross-entropy as ``loss``."""
        return ((logits > 0) == (targets > 0.5)).all(dim=1).sum()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))

    def evaluate(
        self,
        model: nn.Module,
        data: DataLoader,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        worst: int = 0,
    ) -> dict:
        """``metrics.multilabel_report`` at the task's thresholds, with ``loss`` (mean
        binary cross-entropy), ``n`` and, for fitting, ``_scores`` and ``_targets``."""
        all_logits, all_targets = [], []
        with torch.inference_mode():
            for _, targets, logits in logits_batches(model, data, device, autocast_dtype):
                all_logits.append(logits.cpu())
                all_targets.append(targets.float().cpu())
        if not all_logits:
            raise CnnlabError("no readable images to evaluate")
        logits, targets = torch.cat(all_logits), torch.cat(all_targets)  # (N, K) each
        scores = logits.sigmoid()
        report = metrics.multilabel_report(scores, targets, self.classes, self.thresholds)
        report["loss"] = F.binary_cross_entropy_with_logits(logits, targets).item()
        report["n"] = len(targets)
        report["_scores"], report["_targets"] = scores, targets
        return report

    def finish(
        self,
        model: nn.Module,
        val: DataLoader,
        test: DataLoader | None,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        run_dir: Path,
    ) -> tuple[str, dict]:
        """Each label's threshold fitted on val and saved in model.json, then the test
        split (val when there is none) at those thresholds, and per_class.png (precision
        and recall per label) in place of the confusion matrix."""
        fitted = self.evaluate(model, val, device, autocast_dtype)
        self.thresholds = metrics.fit_thresholds(fitted["_scores"], fitted["_targets"])
        meta = read_model_json(run_dir)
        save_model_json(run_dir, replace(meta, thresholds=self.thresholds))
        split, loader = ("test", test) if test is not None else ("val", val)
        result = self.evaluate(model, loader, device, autocast_dtype)
        plots.plot_per_class_pr(result["per_class"], run_dir / "per_class.png")
        return split, result

    @staticmethod
    def headline(report: dict) -> str:
        return (
            f"{measured_on(report)} mAP {report['map']:.3f}  F1 {report['f1']:.3f}"
            f"  exact match {report['exact_match']:.2%}  loss {report['loss']:.4f}"
            f"  ({report['n']} images)"
        )

    @staticmethod
    def details(report: dict) -> list[str]:
        """Each label's AP and F1, lowest first."""
        per_class = report.get("per_class") or {}
        return [
            per_class_line("AP per label", {n: v["ap"] for n, v in per_class.items()}, ".3f"),
            per_class_line("F1 per label", {n: v["f1"] for n, v in per_class.items()}, ".3f"),
        ]

    def batch_pictures(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> list[tuple[torch.Tensor, str]]:
        """(uint8 image, its labels joined by ';') for each image of a training batch."""
        from cnnlab.draw import unnormalise

        def caption(label: torch.Tensor) -> str:
            return ";".join(self.classes[i] for i in label.nonzero().flatten().tolist())

        return [
            (unnormalise(image, self.mean, self.std), caption(label))
            for image, label in zip(images, targets, strict=False)
        ]

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, images: list[torch.Tensor], device: torch.device, topk: int = 5
    ) -> list[dict]:
        """``[{"labels": [{"class", "prob", "threshold"}, ...], "top": [...]}]`` per uint8
        image: ``labels`` every label whose sigmoid score is above its threshold, highest
        first; ``top`` the ``topk`` highest scores whatever their thresholds."""
        thresholds = self.thresholds or [0.5] * len(self.classes)
        k = min(topk, len(self.classes))
        results = []
        for chunk in chunks(images, EVAL_BATCH):
            batch = torch.stack([self.preprocess(image) for image in chunk]).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            scores = model(batch).float().sigmoid().cpu()  # (B, K)
            for row in scores.tolist():
                ranked = sorted(range(len(row)), key=lambda i: -row[i])
                entry = [
                    {"class": self.classes[i], "prob": row[i], "threshold": thresholds[i]}
                    for i in ranked
                ]
                results.append(
                    {
                        "labels": [e for e in entry if e["prob"] > e["threshold"]],
                        "top": entry[:k],
                    }
                )
        return results

    def test_time_augmented(self, model: nn.Module, config_file: Path) -> nn.Module:
        raise CnnlabError(
            "--tta averages softmax probabilities: not for a multi-label run, whose"
            " thresholds were fitted on single views"
        )

    @staticmethod
    def describe(result: dict) -> str:
        if not result["labels"]:
            return "no label above its threshold"
        return ", ".join(f"{t['class']} {t['prob']:.1%}" for t in result["labels"])

    @staticmethod
    def csv_rows(result: dict) -> list[tuple]:
        """One row per label above its threshold (rank 1 the highest score)."""
        return [
            (result["file"], rank, label["class"], label["prob"], label["threshold"])
            for rank, label in enumerate(result["labels"], start=1)
        ]

    @staticmethod
    def draw(image: torch.Tensor, result: dict) -> dict[str, bytes]:
        """The image with every label above its threshold written above it."""
        from cnnlab.draw import caption, encode_png

        text = ", ".join(f"{t['class']} {t['prob']:.0%}" for t in result["labels"]) or "-"
        return {"labelled": encode_png(caption(image, text))}
