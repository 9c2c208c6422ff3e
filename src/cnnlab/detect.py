"""Object detection: train, evaluate and predict with YOLOv1 or Faster R-CNN.

One function per command, each taking plain arguments and returning JSON-serialisable
values: ``detect_train``, ``detect_resume``, ``detect_eval``, ``detect_predict`` and
``detect_demo``.

The classification loop in ``engine.py`` calls ``model(images)`` and then a loss on
(outputs, tensor targets); a detector needs its targets inside the forward pass (Faster
R-CNN samples anchors and RoIs from them) and is scored on a whole set at once (mAP), so
detection has its own loop here, ``_fit``, with the same run-folder layout and the same
atomic writers (``checkpoint``). What is specific to a detector sits behind two methods
every detection model has: ``losses(images, targets) -> {"loss", ...}`` in train mode and
``detect(images, score_threshold, nms_threshold, max_detections)`` in eval mode, both
with boxes in the input's pixels and 0-based labels.

The run folder holds config.yaml, split.json, model.json (``"task": "detect"``),
metrics.csv (``epoch,lr,train_loss,val_map50,val_map,seconds``), last.pt, best.safetensors
(the best validation mAP@0.5; ties: the higher mAP@[.5:.95]), report.json and curves.png.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cnnlab import checkpoint
from cnnlab.data.detection import (
    DetectionDataset,
    DetectionSample,
    DetectionSplits,
    collate_detection,
    eval_transform,
    make_detection_splits,
    read_detection_folder,
    read_rgb,
    train_transform,
)
from cnnlab.engine import pick_device, warmup_cosine
from cnnlab.errors import CnnlabError
from cnnlab.registry import create_model, model_info

log = logging.getLogger(__name__)

METRICS_COLUMNS = ("epoch", "lr", "train_loss", "val_map50", "val_map", "seconds")
MAX_DETECTIONS = 100  # per image, as COCO's evaluation
NMS_THRESHOLD = 0.5
EVAL_SCORE_THRESHOLD = 0.001
_UNDERSTATED_ABOVE = 0.05  # evaluating with a higher score threshold drops real detections
_BATCH = 16  # images per forward pass when predicting
# YOLOv1 for a few hundred 128x128 images trained from scratch: the shared conv head learns
# where the paper's FC head barely does (see cnnlab.models.yolo); 128 / 16 = an 8 x 8 grid,
# and a confidence target of 1 rather than the IoU (darknet's rescore=0).
SHAPES_YOLO_ARGS = {"head": "conv", "reduction": 16, "grid": 8, "rescore": False}


@dataclass
class DetectConfig:
    """Everything that defines a detection run; saved (resolved) as RUN/config.yaml."""

    data: str  # COCO or YOLO-txt folder (with train/ and val/ inside, or split here)
    out: str  # run folder to create; refused when it already holds a run
    model: str = "yolov1"  # a registered detection model: yolov1 | fasterrcnn
    backbone: str = "resnet18"  # zoo model whose features the detector is built on
    backbone_weights: str | None = None  # weights for the backbone: a file or "torchvision"
    model_args: dict = field(default_factory=dict)  # extra builder kwargs, e.g. {"grid": 4}
    epochs: int = 30  # passes over the training split
    batch_size: int = 16  # images per optimizer step
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    weight_decay: float = 5e-4  # not applied to biases and norm scales
    warmup_epochs: int = 1  # linear warm-up length, then cosine decay to 0
    grad_clip: float | None = 10.0  # max global gradient norm; None: no clipping
    img_size: int | None = None  # square input side; None: the model's natural size
    in_channels: int = 3  # 3: colour (grayscale files are converted), 1: grayscale
    augment: bool = True  # colour jitter, flips and scale/translate jitter for training
    val_split: float = 0.2  # fraction held out for validation (unless DIR/val exists)
    patience: int | None = None  # stop after this many epochs without a better val mAP@0.5
    seed: int = 0  # split, initialisation, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0  # DataLoader worker processes
    quiet: bool = False  # no per-epoch lines on stderr

    def __post_init__(self) -> None:
        _require(self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd")
        _require(self.epochs >= 1, "epochs must be at least 1")
        _require(self.batch_size >= 1, "batch_size must be at least 1")
        _require(self.lr > 0, "lr must be positive")
        _require(self.weight_decay >= 0, "weight_decay must be 0 or more")
        _require(self.warmup_epochs >= 0, "warmup_epochs must be 0 or more")
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive")
        _require(self.img_size is None or self.img_size >= 1, "img_size must be positive")
        _require(self.in_channels in (1, 3), "in_channels must be 1 or 3")
        _require(self.patience is None or self.patience >= 1, "patience must be at least 1")
        _require(0 < self.val_split < 1, "val_split must be between 0 and 1")
        _require(self.workers >= 0, "workers must be 0 or more")
        self.model_args = dict(self.model_args)

    @classmethod
    def from_dict(cls, data: dict) -> DetectConfig:
        """Build a config from a mapping (config.yaml), refusing unknown keys."""
        unknown = sorted(set(data) - set(typing.get_type_hints(cls)))
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise CnnlabError(f"unknown config key {unknown[0]!r} (known: {known})")
        return cls(**data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CnnlabError(message)


# ---------------------------------------------------------------------------- commands


def detect_train(
    data_dir: str | Path,
    out: str | Path,
    model: str = "yolov1",
    backbone: str = "resnet18",
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    img_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    quiet: bool = False,
    **settings: Any,
) -> dict:
    """Train a detector on ``data_dir`` into the new run folder ``out``.

    ``settings`` are further ``DetectConfig`` fields (model_args, backbone_weights,
    optimizer, weight_decay, val_split, augment, patience, ...). Returns the validation
    report of the best weights (the ``detect_eval`` dict plus ``best_epoch``).
    """
    cfg = DetectConfig.from_dict(
        {
            "data": str(data_dir),
            "out": str(out),
            "model": model,
            "backbone": backbone,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "img_size": img_size,
            "seed": seed,
            "device": device,
            "quiet": quiet,
            **settings,
        }
    )
    run_dir = Path(cfg.out)
    if checkpoint.is_run_dir(run_dir):
        raise CnnlabError(f"{run_dir} already holds a run; use resume or another out folder")
    cfg = _resolve(cfg)
    splits = make_detection_splits(Path(cfg.data), cfg.val_split, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _fit(cfg, run_dir, splits, state=None)


def detect_resume(run: str | Path, device: str | None = None, quiet: bool | None = None) -> dict:
    """Continue a detection run from its last completed epoch; returns like detect_train."""
    run_dir = checkpoint.require_run_dir(run)
    saved = checkpoint.read_yaml(run_dir / "config.yaml")
    if not isinstance(saved, dict):
        raise CnnlabError(f"{run_dir / 'config.yaml'}: not a mapping of settings")
    overrides = {k: v for k, v in {"device": device, "quiet": quiet}.items() if v is not None}
    cfg = _resolve(DetectConfig.from_dict({**saved, **overrides, "out": str(run_dir)}))
    splits = DetectionSplits.from_json(checkpoint.read_json(run_dir / "split.json"))
    last = run_dir / "last.pt"
    state = checkpoint.load_state(last) if last.is_file() else None
    return _fit(cfg, run_dir, splits, state)


def detect_eval(
    run: str | Path,
    data_dir: str | Path | None = None,
    score_threshold: float = EVAL_SCORE_THRESHOLD,
    device: str = "auto",
) -> dict:
    """COCO mAP of a run's best weights: ``{"map", "map50", "map75", "per_class_ap50":
    {name: ap or None}, "n_images"}``.

    Without ``data_dir`` the run's validation split is used; with it, ``DATA/val`` when
    that folder exists, else every image of ``DATA``. Detections above ``score_threshold``
    (at most 100 per image) are scored with torchmetrics' MeanAveragePrecision on the
    pycocotools backend; ``per_class_ap50`` is None for a class with no object in the set.
    """
    if score_threshold > _UNDERSTATED_ABOVE:
        log.warning(
            "score threshold %g drops low-scoring detections, so mAP will be understated;"
            " evaluate with %g",
            score_threshold,
            EVAL_SCORE_THRESHOLD,
        )
    detector = load_detector(run, device)
    if data_dir is None:
        splits = DetectionSplits.from_json(checkpoint.read_json(detector.path / "split.json"))
        samples = splits.val
    else:
        folder = Path(data_dir) / "val" if (Path(data_dir) / "val").is_dir() else Path(data_dir)
        _, classes, samples = read_detection_folder(folder)
        if classes != detector.classes:
            raise CnnlabError(
                f"{folder}: classes {classes} differ from the run's {detector.classes}"
            )
    predictions = detector.detect([s.path for s in samples], score_threshold)
    return mean_average_precision(predictions, samples, detector.classes)


def detect_predict(
    run: str | Path,
    images: Sequence[str | Path],
    score_threshold: float = 0.25,
    out_dir: str | Path | None = None,
    device: str = "auto",
) -> list[dict]:
    """Detect objects in image files (folders are searched for images):
    ``[{"file", "detections": [{"class", "score", "box": [x1, y1, x2, y2]}]}]`` in pixels
    of the original image. With ``out_dir`` each image is also written with its boxes
    drawn, as ``out_dir/NAME.png``."""
    detector = load_detector(run, device)
    files = _image_paths(images)
    results = []
    for path, found in zip(files, detector.detect(files, score_threshold), strict=True):
        detections = [
            {"class": detector.classes[label], "score": score, "box": box}
            for box, score, label in zip(
                found["boxes"].tolist(),
                found["scores"].tolist(),
                found["labels"].tolist(),
                strict=True,
            )
        ]
        results.append({"file": str(path), "detections": detections})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for result in results:
            draw_detections(Path(result["file"]), result["detections"], detector.classes, out_dir)
    return results


def detect_demo(out: str | Path, epochs: int = 15, n: int = 400, quiet: bool = False) -> dict:
    """Synthetic shapes -> YOLOv1 (resnet18, ``SHAPES_YOLO_ARGS``) at 128x128 -> val mAP
    (about 2.5 minutes and mAP@0.5 0.83 on an idle 2-core CPU).

    Writes ``OUT/shapes`` (data) and ``OUT/run`` (the run folder; an unfinished one is
    resumed), prints mAP@0.5 and returns the evaluation dict plus ``run`` and ``seconds``.
    """
    from cnnlab.data.shapes import write_shapes

    out = Path(out)
    started = time.perf_counter()
    data = out / "shapes"
    if not (data / "annotations.json").is_file():
        write_shapes(data, task="detect", n=n, size=128, seed=0)
    run_dir = out / "run"
    if not checkpoint.is_run_dir(run_dir):
        detect_train(
            data,
            run_dir,
            "yolov1",
            epochs=epochs,
            img_size=128,
            quiet=quiet,
            model_args=SHAPES_YOLO_ARGS,
        )
    elif not (run_dir / "report.json").is_file():
        detect_resume(run_dir, quiet=quiet)
    report = detect_eval(run_dir)
    print(f"YOLOv1 on shapes: validation mAP@0.5 {report['map50']:.3f}", file=sys.stderr)
    return {**report, "run": str(run_dir), "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------- a trained run


@dataclass
class Detector:
    """A trained detector loaded from a run folder (eval mode, best weights)."""

    path: Path
    meta: dict
    classes: list[str]
    model: nn.Module
    device: torch.device

    @property
    def img_size(self) -> int:
        return self.meta["input_size"][1]

    @property
    def in_channels(self) -> int:
        return self.meta["input_size"][0]

    def detect(
        self,
        paths: Sequence[Path],
        score_threshold: float = EVAL_SCORE_THRESHOLD,
        max_detections: int = MAX_DETECTIONS,
    ) -> list[dict[str, Tensor]]:
        """Detections per image file, boxes in pixels of the original image."""
        transform = eval_transform(self.img_size, self.meta["mean"], self.meta["std"])
        return _detect_files(
            self.model,
            paths,
            transform,
            self.in_channels,
            self.device,
            score_threshold,
            max_detections,
        )


def load_detector(run: str | Path, device: str = "auto") -> Detector:
    """Rebuild a detection run's model from model.json and load best.safetensors."""
    run_dir = checkpoint.require_run_dir(run)
    meta = checkpoint.read_model_json(run_dir)
    if meta.get("task") != "detect":
        raise CnnlabError(f"{run_dir} holds a {meta.get('task')} run, not a detection run")
    model = create_model(meta["architecture"], **meta["model_args"])
    checkpoint.load_weights(run_dir / "best.safetensors", model)
    target = pick_device(device)
    model.to(target).eval()
    return Detector(run_dir, meta, list(meta["classes"]), model, target)


@torch.inference_mode()
def _detect_files(
    model: nn.Module,
    paths: Sequence[Path],
    transform: Any,
    in_channels: int,
    device: torch.device,
    score_threshold: float,
    max_detections: int = MAX_DETECTIONS,
) -> list[dict[str, Tensor]]:
    """Run ``model.detect`` over image files in batches, mapping boxes back to each
    file's own pixels (the model sees every image resized to its square input)."""
    model.eval()
    results = []
    for start in range(0, len(paths), _BATCH):
        images = [read_rgb(p, in_channels) for p in paths[start : start + _BATCH]]
        batch = torch.stack([transform(image) for image in images]).to(device)  # (B, C, S, S)
        found = model.detect(batch, score_threshold, NMS_THRESHOLD, max_detections)
        side = batch.shape[-1]
        for image, detections in zip(images, found, strict=True):
            height, width = image.shape[-2:]
            scale = torch.tensor([width, height, width, height], device=device) / side
            results.append(
                {
                    "boxes": (detections["boxes"] * scale).cpu(),
                    "scores": detections["scores"].cpu(),
                    "labels": detections["labels"].cpu(),
                }
            )
    return results


def mean_average_precision(
    predictions: list[dict[str, Tensor]], samples: list[DetectionSample], classes: list[str]
) -> dict:
    """COCO mAP@[.5:.95], mAP@0.5, mAP@0.75 and per-class AP@0.5 of ``predictions``
    against the samples' boxes (torchmetrics, pycocotools backend, up to 100 per image)."""
    from torchmetrics.detection import MeanAveragePrecision

    if not any(s.boxes for s in samples):
        raise CnnlabError("no annotated objects in the evaluation images")
    common = {"box_format": "xyxy", "iou_type": "bbox", "backend": "pycocotools"}
    coco = MeanAveragePrecision(**common)
    at50 = MeanAveragePrecision(**common, iou_thresholds=[0.5], class_metrics=True)
    targets = [
        {
            "boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(s.labels, dtype=torch.int64),
        }
        for s in samples
    ]
    for metric in (coco, at50):
        metric.update(predictions, targets)
    result, result50 = coco.compute(), at50.compute()
    per_class: dict[str, float | None] = dict.fromkeys(classes)
    labels = result50["classes"].reshape(-1).tolist()
    for label, ap in zip(labels, result50["map_per_class"].reshape(-1).tolist(), strict=True):
        per_class[classes[label]] = ap if ap >= 0 else None  # -1: no object of this class
    return {
        "map": result["map"].item(),
        "map50": result["map_50"].item(),
        "map75": result["map_75"].item(),
        "per_class_ap50": per_class,
        "n_images": len(samples),
    }


def draw_detections(
    path: Path, detections: list[dict], classes: list[str], out_dir: str | Path
) -> Path:
    """Write ``out_dir/NAME.png``: the image with each box and "class score" drawn."""
    from torchvision.io import encode_png
    from torchvision.utils import draw_bounding_boxes

    image = read_rgb(path, 3)
    palette = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]
    if detections:
        image = draw_bounding_boxes(
            image,
            torch.tensor([d["box"] for d in detections]),
            labels=[f"{d['class']} {d['score']:.2f}" for d in detections],
            colors=[palette[classes.index(d["class"]) % len(palette)] for d in detections],
            width=2,
        )
    target = Path(out_dir) / f"{path.stem}.png"
    checkpoint.atomic_write_bytes(target, encode_png(image).numpy().tobytes())
    return target


def _image_paths(images: Sequence[str | Path]) -> list[Path]:
    from cnnlab.data.folders import IMAGE_EXTENSIONS

    files: list[Path] = []
    for path in map(Path, images):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CnnlabError(f"{path}: no image files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CnnlabError(f"{path}: no such file or folder")
    return files


# ---------------------------------------------------------------------------- the loop


def _resolve(cfg: DetectConfig) -> DetectConfig:
    """Fill img_size from the model and refuse a model that is not a detector."""
    info = model_info(cfg.model)
    if info.task != "detect":
        raise CnnlabError(f"{cfg.model} is a {info.task} model, not a detector")
    return replace(cfg, img_size=cfg.img_size or info.input_size[1])


def _build_model(cfg: DetectConfig, num_classes: int, pretrained: bool) -> tuple[nn.Module, dict]:
    """The model and the keyword arguments that rebuild it (without backbone weights:
    best.safetensors holds every weight)."""
    args = {"num_classes": num_classes, "in_channels": cfg.in_channels, "backbone": cfg.backbone}
    args.update(cfg.model_args)
    weights = cfg.backbone_weights if pretrained else None
    try:
        model = create_model(cfg.model, backbone_weights=weights, **args)
    except TypeError as error:  # a model_args key the builder does not take
        raise CnnlabError(f"{cfg.model}: {error}") from None
    minimum = getattr(model, "min_input_size", 1)
    if cfg.img_size < minimum:
        raise CnnlabError(
            f"{cfg.model} needs images of at least {minimum}x{minimum}; img_size is {cfg.img_size}"
        )
    return model, args


def _fit(cfg: DetectConfig, run_dir: Path, splits: DetectionSplits, state: dict | None) -> dict:
    from cnnlab import __version__
    from cnnlab.data.transforms import default_stats

    device = pick_device(cfg.device)
    _seed_everything(cfg.seed)
    mean, std = default_stats(cfg.in_channels)
    model, model_args = _build_model(cfg, len(splits.classes), pretrained=state is None)
    model.to(device)
    generator = torch.Generator()  # reseeded every epoch: shuffling is epoch-determined
    dataset = DetectionDataset(
        splits.train, train_transform(cfg.img_size, mean, std, cfg.augment), cfg.in_channels
    )
    # Dropping the partial last batch avoids a batch of one, which BatchNorm cannot train on.
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(dataset) > cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=collate_detection,
    )
    optimizer = _make_optimizer(model, cfg)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.warmup_epochs * steps, cfg.epochs * steps),
    )
    val_transform = eval_transform(cfg.img_size, mean, std)

    start_epoch, best, stale, history = 0, None, 0, []
    if state is None:
        checkpoint.write_yaml(run_dir / "config.yaml", asdict(cfg))
        checkpoint.write_json(run_dir / "split.json", splits.to_json())
        meta = {
            "task": "detect",
            "architecture": cfg.model,
            "model_args": model_args,
            "classes": list(splits.classes),
            "input_size": [cfg.in_channels, cfg.img_size, cfg.img_size],
            "mean": list(mean),
            "std": list(std),
            "cnnlab_version": __version__,
        }
        checkpoint.save_model_json(run_dir, meta)  # last: model.json marks a run folder
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"], state["best"]
        stale, history = state["epochs_without_improvement"], state["history"]

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience is not None and stale >= cfg.patience:
            _say(cfg, f"early stop: no better val mAP@0.5 for {stale} epochs")
            break
        _seed_everything(cfg.seed * 1000 + epoch)
        generator.manual_seed(cfg.seed * 1000 + epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = _train_epoch(model, loader, optimizer, scheduler, cfg, device, epoch)
        predictions = _detect_files(
            model,
            [s.path for s in splits.val],
            val_transform,
            cfg.in_channels,
            device,
            EVAL_SCORE_THRESHOLD,
        )
        val = mean_average_precision(predictions, splits.val, splits.classes)
        improved = best is None or (val["map50"], val["map"]) > (best["map50"], best["map"])
        if improved:
            best = {"map50": val["map50"], "map": val["map"], "epoch": epoch + 1}
        stale = 0 if improved else stale + 1
        history.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                "val_map50": val["map50"],
                "val_map": val["map"],
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        # last.pt first: it is the truth a resume starts from.
        checkpoint.save_state(
            run_dir / "last.pt",
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best": best,
                "epochs_without_improvement": stale,
                "history": history,
            },
        )
        checkpoint.atomic_write_text(run_dir / "metrics.csv", _metrics_csv(history))
        if improved:
            checkpoint.save_weights(
                run_dir / "best.safetensors", model, metadata={"epoch": str(epoch + 1)}
            )
        row = history[-1]
        _say(
            cfg,
            f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.3f}"
            f"  val mAP@0.5 {row['val_map50']:.3f}  mAP {row['val_map']:.3f}"
            f"  {row['seconds']:.0f}s",
        )

    checkpoint.load_weights(run_dir / "best.safetensors", model)
    predictions = _detect_files(
        model,
        [s.path for s in splits.val],
        val_transform,
        cfg.in_channels,
        device,
        EVAL_SCORE_THRESHOLD,
    )
    report = {
        "split": "val",
        "best_epoch": best["epoch"],
        **mean_average_precision(predictions, splits.val, splits.classes),
    }
    checkpoint.write_json(run_dir / "report.json", report)
    _plot_curves(history, run_dir / "curves.png")
    _say(cfg, f"val mAP@0.5 {report['map50']:.3f}  mAP {report['map']:.3f}  -> {run_dir}")
    return report


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: DetectConfig,
    device: torch.device,
    epoch: int,
) -> float:
    """One pass over the training images; returns the mean loss per image."""
    model.train()
    loss_sum, seen = torch.zeros((), device=device), 0
    for images, targets in loader:  # (B, C, S, S), [{"boxes": (N, 4), "labels": (N,)}]
        images = images.to(device)
        targets = [
            {"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets
        ]
        loss = model.losses(images, targets)["loss"]
        if not torch.isfinite(loss):
            raise CnnlabError(f"the loss became {loss.item()} in epoch {epoch + 1}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(images)
        seen += len(images)
    return (loss_sum / max(seen, 1)).item()


def _make_optimizer(model: nn.Module, cfg: DetectConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales (1-D tensors): decaying them only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    # The fused kernels update every tensor in one pass: on a CPU, AdamW's step over
    # YOLOv1's 26M parameters drops from about 1 s to 0.1 s.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def _metrics_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def _plot_curves(history: list[dict], out: Path) -> None:
    """Training loss and validation mAP per epoch, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, map_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], marker="o", markersize=3)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key, label in (("val_map50", "mAP@0.5"), ("val_map", "mAP@[.5:.95]")):
        map_ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=label)
    map_ax.set(xlabel="epoch", ylabel="mAP", title="validation mAP", ylim=(0, 1))
    map_ax.legend()
    for ax in (loss_ax, map_ax):
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    checkpoint.atomic_write_bytes(out, buffer.getvalue())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _say(cfg: DetectConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)
