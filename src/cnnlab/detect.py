"""Object detection: train, evaluate and predict with YOLOv1 or Faster R-CNN.

One function per command, each taking plain arguments and returning JSON-serialisable
values: ``detect_train``, ``detect_resume``, ``detect_eval``, ``detect_predict`` and
``detect_demo``. Training runs ``cnnlab.engine``'s loop with ``DetectTask``.

What is specific to a detector sits behind two calls every detection model answers:
``model(images, targets) -> {"loss", ...}`` in train mode (a detector needs its targets
inside the forward pass: Faster R-CNN samples anchors and RoIs from them) and
``detect(images, score_threshold, nms_threshold, max_detections)`` in eval mode, both with
boxes in the input's pixels and 0-based labels. Validation scores the whole set at once
(COCO mAP), from the image files, as ``detect eval`` does.

The run folder holds config.yaml, split.json, model.json (``"task": "detect"``),
metrics.csv (``METRICS_COLUMNS``), last.pt, best.safetensors (the best validation
mAP@0.5; ties: the higher mAP@[.5:.95]), report.json and curves.png.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cnnlab import checkpoint, distributed, engine
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
from cnnlab.engine import TrainConfig, pick_device
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
# Defaults that differ from classification's: YOLOv1's weight decay, a looser clip for the
# summed detection losses, 20% validation, colour files (grayscale ones are converted).
DETECT_DEFAULTS = {
    "epochs": 30,
    "batch_size": 16,
    "weight_decay": 5e-4,
    "grad_clip": 10.0,
    "val_split": 0.2,
    "test_split": 0.0,
    "in_channels": 3,
}


# ---------------------------------------------------------------------------- the task


@dataclass
class DetectTask(engine.Task):
    """Object detection for ``cnnlab.engine``'s loop."""

    classes: list[str]
    in_channels: int
    img_size: int
    name: ClassVar[str] = "detect"
    columns: ClassVar[tuple[str, ...]] = METRICS_COLUMNS
    curves: ClassVar[dict] = {
        "training loss": {"train_loss": "train"},
        "validation mAP": {"val_map50": "mAP@0.5", "val_map": "mAP@[.5:.95]"},
    }
    best_label: ClassVar[str] = "val mAP@0.5"

    # -- before the loop

    @classmethod
    def setup(cls, cfg: TrainConfig) -> tuple[TrainConfig, DetectionSplits]:
        """Check the model and the settings, read the annotations, split them."""
        cfg = _resolve(cfg)
        return cfg, make_detection_splits(Path(cfg.data), cfg.val_split, cfg.seed)

    @classmethod
    def reopen(cls, cfg: TrainConfig, split_json: dict) -> tuple[TrainConfig, DetectionSplits]:
        return _resolve(cfg), DetectionSplits.from_json(split_json)

    @classmethod
    def for_run(cls, cfg: TrainConfig, splits: DetectionSplits, device: torch.device) -> DetectTask:
        return cls(splits.classes, cfg.in_channels, cfg.img_size)

    def build_model(self, cfg: TrainConfig, pretrained: bool) -> tuple[nn.Module, dict]:
        """``Task.build_model``, refusing an image size below the detector's minimum."""
        model, args = super().build_model(cfg, pretrained)
        minimum = getattr(model, "min_input_size", 1)
        if cfg.img_size < minimum:
            raise CnnlabError(
                f"{cfg.model} needs images of at least {minimum}x{minimum};"
                f" img_size is {cfg.img_size}"
            )
        return model, args

    def loaders(
        self,
        cfg: TrainConfig,
        splits: DetectionSplits,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator,
        device: torch.device,
        ctx: distributed.Context,
    ) -> tuple[DataLoader, tuple[list[DetectionSample], Any], None]:
        """Training batches; validation reads the image files as ``detect eval`` does."""
        augment = cfg.augment != "none"
        train_tf = train_transform(cfg.img_size, mean, std, augment, cfg.flip)
        dataset = DetectionDataset(splits.train, train_tf, cfg.in_channels)
        train = engine.make_train_loader(dataset, cfg, generator, device, ctx, collate_detection)
        return train, (splits.val, eval_transform(cfg.img_size, mean, std)), None

    # -- every step

    @staticmethod
    def to_device(targets: list[dict], device: torch.device) -> list[dict[str, Tensor]]:
        return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]

    @staticmethod
    def forward_loss(
        net: nn.Module, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[None, Tensor]:
        return None, net(images, targets)["loss"]

    # -- every epoch

    def evaluate(
        self,
        model: nn.Module,
        val: tuple[list[DetectionSample], Any],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict:
        """``mean_average_precision`` of the model's detections on the validation images."""
        samples, transform = val
        paths = [s.path for s in samples]
        predictions = _detect_files(
            model, paths, transform, self.in_channels, device, EVAL_SCORE_THRESHOLD
        )
        return mean_average_precision(predictions, samples, self.classes)

    @staticmethod
    def rank(val: dict) -> tuple[float, ...]:
        """Higher is better: val mAP@0.5, then (on a tie) mAP@[.5:.95]."""
        return (val["map50"], val["map"])

    @staticmethod
    def history_row(train_score: float | None, val: dict) -> dict:
        return {"val_map50": val["map50"], "val_map": val["map"]}

    @staticmethod
    def summary(row: dict) -> str:
        return (
            f"train loss {row['train_loss']:.3f}"
            f"  val mAP@0.5 {row['val_map50']:.3f}  mAP {row['val_map']:.3f}"
        )

    # -- after the loop

    @staticmethod
    def headline(report: dict) -> str:
        return f"mAP@0.5 {report['map50']:.3f}  mAP {report['map']:.3f}"


def _resolve(cfg: TrainConfig) -> TrainConfig:
    """Refuse a model that is not a detector and settings detection has no use for; fill
    img_size from the model."""
    info = model_info(cfg.model)
    if info.task != "detect":
        raise CnnlabError(f"{cfg.model} is a {info.task} model, not a detector")
    if cfg.augment == "strong":
        raise CnnlabError("detection has one augmentation recipe: augment light or none")
    if cfg.balance != "none" or cfg.label_smoothing or cfg.weights or cfg.freeze_backbone:
        raise CnnlabError(
            "balance, label_smoothing, weights and freeze_backbone are classification"
            " settings; a detector takes backbone_weights"
        )
    return replace(cfg, img_size=cfg.img_size or info.input_size[1])


# ---------------------------------------------------------------------------- commands


def detect_train(
    data_dir: str | Path,
    out: str | Path,
    model: str = "yolov1",
    backbone: str = "resnet18",
    backbone_weights: str | None = None,
    model_args: dict | None = None,
    **settings: Any,
) -> dict:
    """Train a detector on ``data_dir`` (COCO or YOLO-txt) into the new run folder ``out``.

    ``settings`` are ``TrainConfig`` fields (epochs, batch_size, lr, img_size, optimizer,
    weight_decay, val_split, augment "light" or "none", patience, seed, device, workers,
    quiet, ...), with ``DETECT_DEFAULTS`` where unset. ``backbone_weights`` is a weight
    file (or "torchvision") for the zoo backbone. Returns the validation report of the best
    weights (the ``detect_eval`` dict plus ``split`` and ``best_epoch``).
    """
    args = {"backbone": backbone, **(model_args or {})}
    if backbone_weights is not None:
        args["backbone_weights"] = str(backbone_weights)
    cfg = TrainConfig.from_dict(
        {
            **DETECT_DEFAULTS,
            **settings,
            "data": str(data_dir),
            "out": str(out),
            "model": model,
            "model_args": args,
        }
    )
    return engine.train(cfg, DetectTask)


def detect_resume(run: str | Path, device: str | None = None, quiet: bool | None = None) -> dict:
    """Continue a detection run from its last completed epoch; returns like detect_train."""
    return engine.resume(run, DetectTask, device=device, quiet=quiet)


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
    (2 min 43 s and mAP@0.5 0.83 on an idle 2-core CPU; 0.72 with one thread, whose
    different float sums lead 15 short epochs elsewhere).

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
    # One process scores the whole set; torchmetrics would otherwise wait for the other
    # processes of a torchrun group to send their share at compute().
    common = {
        "box_format": "xyxy",
        "iou_type": "bbox",
        "backend": "pycocotools",
        "sync_on_compute": False,
    }
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
