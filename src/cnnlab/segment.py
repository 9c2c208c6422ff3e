"""Semantic segmentation: the task object, training, evaluation, prediction and the demo.

``SegmentTask`` holds what differs from classification (per-pixel cross-entropy with an
ignore index, mIoU from one confusion matrix over the whole set, best checkpoint by
validation mIoU); ``cnnlab.engine``'s loop trains with it. The run folder has the
classification layout: config.yaml, split.json, metrics.csv (``METRICS_COLUMNS``),
best.safetensors, model.json (``"task": "segment"``), last.pt, report.json, curves.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from cnnlab import checkpoint, distributed, engine
from cnnlab.data import segmentation as segdata
from cnnlab.data.segmentation import IGNORE_INDEX, SegSplits
from cnnlab.engine import TrainConfig, pick_device
from cnnlab.errors import CnnlabError
from cnnlab.registry import create_model, model_info

METRICS_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_pixel_acc",
    "val_loss",
    "val_pixel_acc",
    "val_miou",
    "seconds",
)
# Overlay colours: background stays uncoloured, then a qualitative palette (tab10), cycled.
_PALETTE = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.float32,
)


# ---------------------------------------------------------------------------- metrics


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) pixel counts, rows the true class and columns the predicted one; pixels whose
    target is the ignore index (255) are left out. Inputs: same-shape integer tensors."""
    valid = targets != IGNORE_INDEX
    index = targets[valid] * num_classes + preds[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, classes: Sequence[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix.

    IoU_c = TP / (TP + FP + FN); the mean runs over the classes with a non-zero union
    (present in the targets or the predictions); a class with none gets ``None``.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union.clamp(min=1)
    present = union > 0
    total = confusion.sum()
    return {
        "miou": iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": (true_positive.sum() / total).item() if total > 0 else 0.0,
        "per_class_iou": {
            name: iou[i].item() if present[i] else None for i, name in enumerate(classes)
        },
    }


# ---------------------------------------------------------------------------- the task


@dataclass
class SegmentTask(engine.Task):
    """Semantic segmentation for ``cnnlab.engine``'s loop."""

    classes: list[str]
    name: ClassVar[str] = "segment"
    columns: ClassVar[tuple[str, ...]] = METRICS_COLUMNS
    curves: ClassVar[dict] = {
        "loss": ("train_loss", "val_loss"),
        "pixel accuracy": ("train_pixel_acc", "val_pixel_acc"),
        "validation mIoU": ("val_miou",),
    }
    score_label: ClassVar[str | None] = "pixel acc"
    best_label: ClassVar[str] = "val mIoU"

    # -- before the loop

    @classmethod
    def setup(cls, cfg: TrainConfig) -> tuple[TrainConfig, SegSplits]:
        """Check the model and the image/mask pairs; fill img_size, in_channels, decay."""
        if model_info(cfg.model).task != "segment":
            raise CnnlabError(
                f"{cfg.model} is a {model_info(cfg.model).task} model, not a segmentation one"
            )
        splits = segdata.make_seg_splits(cfg.data, cfg.val_split, cfg.seed)
        if len(splits.classes) > IGNORE_INDEX:
            raise CnnlabError(f"{splits.root}/classes.txt: at most {IGNORE_INDEX} classes")
        segdata.check_pairs(splits.train + splits.val, len(splits.classes))
        return _resolve(cfg, splits), splits

    @classmethod
    def reopen(cls, cfg: TrainConfig, split_json: dict) -> tuple[TrainConfig, SegSplits]:
        return cfg, SegSplits.from_json(split_json)

    @classmethod
    def for_run(cls, cfg: TrainConfig, splits: SegSplits, device: torch.device) -> SegmentTask:
        return cls(splits.classes)

    def loaders(
        self,
        cfg: TrainConfig,
        splits: SegSplits,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator,
        device: torch.device,
        ctx: distributed.Context,
    ) -> tuple[DataLoader, DataLoader, None]:
        k = len(self.classes)
        train_tf = segdata.train_transform(cfg.img_size, mean, std, cfg.augment, cfg.flip)
        train_set = segdata.SegmentationDataset(splits.train, train_tf, k, cfg.in_channels)
        train = engine.make_train_loader(train_set, cfg, generator, device, ctx, self.collate)
        val_set = segdata.SegmentationDataset(
            splits.val, segdata.eval_transform(mean, std), k, cfg.in_channels
        )
        val = DataLoader(
            val_set, batch_size=train.batch_size, num_workers=cfg.workers, collate_fn=self.collate
        )
        return train, val, None

    # -- every step

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled pixels; outputs (B, K, H, W), targets (B, H, W)."""
        return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)

    @staticmethod
    def score(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(right pixels, labelled pixels) in the batch, as 0-dim device tensors."""
        labelled = targets != IGNORE_INDEX
        return ((outputs.argmax(dim=1) == targets) & labelled).sum(), labelled.sum()

    @staticmethod
    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad images (0) and masks (ignore) of different sizes into one batch."""
        return segdata.collate_pad(batch)

    # -- every epoch

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict:
        """``{"miou", "pixel_acc", "per_class_iou", "loss", "n"}`` over the whole loader
        (one confusion matrix; ``loss`` the mean cross-entropy per labelled pixel) plus
        ``_confusion`` (K, K)."""
        model.eval()
        k = len(self.classes)
        confusion = torch.zeros(k, k, dtype=torch.long, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n = 0
        for images, targets in loader:  # (B, C, H, W), (B, H, W)
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(images).float()  # (B, K, H, W)
            loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            confusion += confusion_matrix(logits.argmax(dim=1), targets, k)
            n += len(images)
        if n == 0:
            raise CnnlabError("no images to evaluate")
        confusion = confusion.cpu()
        report = scores(confusion, self.classes)
        report["loss"] = (loss_sum.cpu() / max(1, int(confusion.sum()))).item()
        report["n"] = n
        report["_confusion"] = confusion
        return report

    @staticmethod
    def rank(val: dict) -> tuple[float, ...]:
        """Higher is better: val mIoU, then (on a tie) the lower val loss."""
        return (val["miou"], -val["loss"])

    @staticmethod
    def history_row(train_score: float | None, val: dict) -> dict:
        return {
            "train_pixel_acc": train_score,
            "val_loss": val["loss"],
            "val_pixel_acc": val["pixel_acc"],
            "val_miou": val["miou"],
        }

    @staticmethod
    def summary(row: dict) -> str:
        return (
            f"train loss {row['train_loss']:.3f} pixel acc {100 * row['train_pixel_acc']:.1f}%"
            f"  val loss {row['val_loss']:.3f} mIoU {100 * row['val_miou']:.1f}%"
        )

    # -- after the loop

    @staticmethod
    def headline(report: dict) -> str:
        return f"mIoU {report['miou']:.4f}  pixel acc {report['pixel_acc']:.4f}"


# ---------------------------------------------------------------------------- training


def segment_train(
    data_dir: str | Path,
    out: str | Path,
    model: str = "fcn8s",
    backbone: str = "resnet18",
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    img_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    quiet: bool = False,
    backbone_weights: str | None = None,
    weights: str | None = None,
    val_split: float = 0.1,
    augment: str = "light",
    flip: bool = True,
    optimizer: str = "adamw",
    weight_decay: float | None = None,
    warmup_epochs: int = 1,
    patience: int | None = None,
    in_channels: int | None = None,
    workers: int = 0,
    model_args: dict | None = None,
) -> dict:
    """Train a segmentation model on DIR (see ``cnnlab.data.segmentation``) into the new run
    folder ``out``; returns the validation report of the best epoch.

    ``img_size``: side of the random training crops, taken at the images' own scale (the
    model is fully convolutional: evaluation and prediction run on whole images); None takes
    the shorter side of the first training image. ``weights``: a whole-model file to start
    from; ``backbone_weights``: a classifier's weight file for the backbone (head dropped).
    """
    args = {"backbone": backbone, **(model_args or {})}
    if backbone_weights is not None:
        args["backbone_weights"] = str(backbone_weights)
    cfg = TrainConfig(
        data=str(data_dir),
        out=str(out),
        model=model,
        model_args=args,
        weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        img_size=img_size,
        in_channels=in_channels,
        augment=augment,
        flip=flip,
        patience=patience,
        val_split=val_split,
        test_split=0.0,
        seed=seed,
        device=device,
        workers=workers,
        quiet=quiet,
    )
    return engine.train(cfg, SegmentTask)


def segment_resume(run: str | Path, device: str | None = None, quiet: bool | None = None) -> dict:
    """Continue a segmentation run from its last completed epoch (RUN/last.pt)."""
    return engine.resume(run, SegmentTask, device=device, quiet=quiet)


def _resolve(cfg: TrainConfig, splits: SegSplits) -> TrainConfig:
    """Fill img_size, in_channels and weight_decay from the data and the optimizer."""
    from cnnlab.data.folders import detect_in_channels

    img_size = cfg.img_size
    if img_size is None:
        with Image.open(splits.train[0][0]) as first:
            img_size = min(first.size)
    minimum = model_info(cfg.model).min_size
    if img_size < minimum:
        raise CnnlabError(
            f"{cfg.model} needs images of at least {minimum}x{minimum}; img_size is {img_size}"
        )
    in_channels = cfg.in_channels or detect_in_channels([image for image, _ in splits.train])
    weight_decay = cfg.weight_decay
    if weight_decay is None:
        weight_decay = engine.DEFAULT_WEIGHT_DECAY[cfg.optimizer]
    return replace(cfg, img_size=img_size, in_channels=in_channels, weight_decay=weight_decay)


# ---------------------------------------------------------------------------- using a run


@dataclass
class SegmentRun:
    """A trained segmentation model loaded from a run folder."""

    path: Path
    meta: dict
    classes: list[str]
    model: nn.Module  # eval mode, best weights
    device: torch.device

    @property
    def in_channels(self) -> int:
        return int(self.meta["input_size"][0])

    def eval_transform(self) -> Any:
        """The joint (image, mask) evaluation transform the run was validated with."""
        return segdata.eval_transform(self.meta["mean"], self.meta["std"])


def load_segment_run(path: str | Path, device: str = "cpu") -> SegmentRun:
    """Rebuild a segmentation run's model from model.json and best.safetensors."""
    run_dir = checkpoint.require_run_dir(path)
    meta = checkpoint.read_model_json(run_dir)
    source = run_dir / "model.json"
    if not isinstance(meta, dict) or meta.get("task") != "segment":
        task = meta.get("task", "classify") if isinstance(meta, dict) else "unknown"
        raise CnnlabError(f"{source}: a {task} run, not a segmentation run")
    missing = [
        k
        for k in ("architecture", "model_args", "classes", "input_size", "mean", "std")
        if k not in meta
    ]
    if missing:
        raise CnnlabError(f"{source}: missing {', '.join(missing)}")
    try:
        model = create_model(meta["architecture"], **meta["model_args"])
    except (CnnlabError, TypeError) as error:
        raise CnnlabError(f"{source}: {error}") from None
    checkpoint.load_weights(run_dir / "best.safetensors", model)
    target = pick_device(device)
    model.to(target).eval()
    return SegmentRun(run_dir, meta, list(meta["classes"]), model, target)


def segment_eval(
    run: str | Path, data_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 8
) -> dict:
    """mIoU, pixel accuracy and per-class IoU of a run: on its own validation split, or on
    every image/mask pair of ``data_dir`` (its val/ part when it has one). Returns
    ``{"miou", "pixel_acc", "per_class_iou": {name: iou}, "loss", "n"}``."""
    loaded = load_segment_run(run, device)
    if data_dir is None:
        samples = SegSplits.from_json(checkpoint.read_json(loaded.path / "split.json")).val
    else:
        samples = _folder_pairs(Path(data_dir), loaded.classes)
    dataset = segdata.SegmentationDataset(
        samples, loaded.eval_transform(), len(loaded.classes), loaded.in_channels
    )
    task = SegmentTask(loaded.classes)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=task.collate)
    report = task.evaluate(loaded.model, loader, loaded.device)
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _folder_pairs(root: Path, classes: list[str]) -> list[segdata.SegSample]:
    found = segdata.read_classes(root)
    if found != classes:
        raise CnnlabError(
            f"{root / 'classes.txt'}: classes {found} differ from the run's {classes}"
        )
    samples = segdata.scan_pairs(root / "val" if (root / "val").is_dir() else root)
    segdata.check_pairs(samples, len(classes))
    return samples


@torch.inference_mode()
def segment_predict(
    run: str | Path, images: Sequence[str | Path], out_dir: str | Path, device: str = "cpu"
) -> list[dict]:
    """Segment each image (files or folders of images) and write ``out_dir/NAME.png`` (class
    index per pixel, 8-bit, the image's size) and ``out_dir/NAME_overlay.png``. Returns
    ``[{"file", "mask", "overlay", "class_fractions": {name: fraction}}]``."""
    from cnnlab.data.folders import read_image
    from cnnlab.data.transforms import ToChannels

    loaded = load_segment_run(run, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    to_channels, transform = ToChannels(loaded.in_channels), loaded.eval_transform()
    results = []
    for path in _expand(images):
        image = read_image(path)  # uint8 (C, H, W)
        x = transform(tv_tensors.Image(to_channels(image)))  # (C, H, W)
        logits = loaded.model(x.unsqueeze(0).to(loaded.device))  # (1, K, H, W)
        mask = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()  # (H, W)
        mask_path, overlay_path = out_dir / f"{path.stem}.png", out_dir / f"{path.stem}_overlay.png"
        Image.fromarray(mask, mode="L").save(mask_path)
        Image.fromarray(overlay(image, mask)).save(overlay_path)
        counts = np.bincount(mask.ravel(), minlength=len(loaded.classes)) / mask.size
        results.append(
            {
                "file": str(path),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "class_fractions": {
                    n: float(c) for n, c in zip(loaded.classes, counts, strict=True)
                },
            }
        )
    return results


def overlay(image: torch.Tensor, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the image with every non-background class tinted in its colour."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    pixels = rgb.permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, 3)
    colours = _PALETTE[(mask.astype(np.int64) - 1) % len(_PALETTE)]  # (H, W, 3)
    tinted = (1 - alpha) * pixels + alpha * colours
    return np.where(mask[..., None] > 0, tinted, pixels).round().astype(np.uint8)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    from cnnlab.data.folders import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in [paths] if isinstance(paths, str | Path) else paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise CnnlabError(f"{path}: no such file or folder")
    if not files:
        raise CnnlabError("no images to segment")
    return files


# ---------------------------------------------------------------------------- demo


def segment_demo(
    out: str | Path,
    n: int = 300,
    size: int = 96,
    epochs: int = 15,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """Synthetic shapes -> FCN-8s (ResNet-18 backbone, trained on 64x64 crops) -> validation
    mIoU, in a few minutes on two CPU cores. Writes ``out/shapes`` (the data) and
    ``out/run`` (the run folder); returns the report with ``"run"`` added."""
    from cnnlab.data.shapes import write_shapes

    out = Path(out)
    data = out / "shapes"
    if not (data / "classes.txt").is_file():
        write_shapes(data, task="segment", n=n, size=size, seed=0)
    report = segment_train(
        data,
        out / "run",
        model="fcn8s",
        backbone="resnet18",
        epochs=epochs,
        batch_size=4,
        lr=2e-3,
        img_size=64,
        augment="none",
        seed=0,
        device=device,
        quiet=quiet,
    )
    return {"run": str(out / "run"), **report}
