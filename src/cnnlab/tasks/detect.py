"""Object detection: the detector's own losses, COCO mAP (pycocotools, through torchmetrics),
best checkpoint by validation mAP@0.5; boxes and the validation report of a finished run.

What is specific to a detector sits behind its contract
(``cnnlab.models.detection.Detector``): ``model(images, targets) -> {"loss", ...}`` in
train mode and ``model.detect(images, limits)`` in eval mode, both with boxes in the input's
pixels and 0-based labels. Validation scores the whole set at once from the image files, as
``cnnlab detect eval`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cnnlab.config import TrainConfig, check_task_settings
from cnnlab.data.detect import (
    DetectionDataset,
    DetectionSample,
    DetectionSplits,
    collate_detection,
    make_detection_splits,
    read_detection_folder,
)
from cnnlab.data.images import read_image
from cnnlab.data.loaders import train_loader
from cnnlab.data.splits import split_folder
from cnnlab.data.transforms import default_stats, detect_eval, detect_train
from cnnlab.errors import CnnlabError
from cnnlab.metrics import mean_average_precision
from cnnlab.models.detection import EVAL_LIMITS, PREDICT_LIMITS, DetectLimits, Detector
from cnnlab.models.factory import model_info
from cnnlab.tasks import TASKS
from cnnlab.tasks.common import PREDICT_BATCH, RunFacts, chunks, measured_on, per_class_line
from cnnlab.tasks.options import Option
from cnnlab.tasks.spec import Figure, MetricSpec

log = logging.getLogger(__name__)

VAL_PICTURES = 6  # validation images drawn into the run folder
_UNDERSTATED_ABOVE = 0.05  # evaluating with a higher score threshold drops real detections
# YOLOv1 for a few hundred 128x128 images trained from scratch: the shared conv head learns
# where the paper's FC head barely does (see cnnlab.models.detection.yolov1); 128 / 16 = an
# 8 x 8 grid, and a confidence target of 1 rather than the IoU (darknet's rescore=0).
SHAPES_YOLO_ARGS = {"head": "conv", "reduction": 16, "grid": 8, "rescore": False}


@dataclass
class DetectTask(RunFacts):
    """Detection for the training loop (``cnnlab.engine.task.TrainingTask``) and for a
    finished run (``cnnlab.tasks.inference.InferenceTask``)."""

    name: ClassVar[str] = "detect"
    options: ClassVar[tuple[Option, ...]] = TASKS["detect"].options
    metrics: ClassVar[MetricSpec] = MetricSpec(
        val=(Figure("map50", "mAP@0.5"), Figure("map", "mAP")),
        # Higher is better: val mAP@0.5, then (on a tie) mAP@[.5:.95].
        best=("map50", "map"),
        best_label="val mAP@0.5",
        curves={
            "training loss": {"train_loss": "train"},
            "validation mAP": {"val_map50": "mAP@0.5", "val_map": "mAP@[.5:.95]"},
        },
        in_line=("map50", "map"),
    )
    channels_last: ClassVar[bool] = False
    drawings: ClassVar[tuple[str, ...]] = ("drawing",)  # what ``draw`` returns, in order
    csv_columns: ClassVar[tuple[str, ...]] = (  # --save-csv; boxes in the image's pixels
        "file", "class", "score", "x1", "y1", "x2", "y2"
    )  # fmt: skip
    eval_split: ClassVar[str] = TASKS["detect"].eval_split  # what `cnnlab eval RUN` reports on
    exported_logits: ClassVar[str | None] = None  # export: what the detector declares

    # -- training

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, DetectTask]:
        """Refuse settings detection has no use for; read the annotations and split them."""
        check_task_settings(cfg, "detect")
        if split_file is None:
            splits = make_detection_splits(Path(cfg.data), cfg.val_split, cfg.seed)
        else:
            splits = DetectionSplits.from_json(split_file)
        img_size = cfg.img_size or model_info(cfg.model).input_size[1]
        in_channels = cfg.in_channels or 3
        cfg = replace(cfg, img_size=img_size, in_channels=in_channels)
        mean, std = default_stats(in_channels, pretrained=cfg.weights is not None)
        return cfg, cls(splits.classes, in_channels, img_size, mean, std, splits)

    def loaders(
        self,
        cfg: TrainConfig,
        generator: torch.Generator,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[DataLoader, list[DetectionSample], None]:
        """Training batches; validation reads the image files as ``detect eval`` does."""
        transform = detect_train(self.img_size, cfg.augment, cfg.flip, self.mean, self.std)
        source = proposal_source(cfg.model, cfg.model_args, cfg.workers)
        proposals = None
        if source is not None:  # under torchrun the first process computes and caches them
            paths = [sample.path for sample in self.splits.train + self.splits.val]
            if world_size > 1 and rank != 0:
                torch.distributed.barrier()
            proposals = source.boxes(paths, progress=rank == 0)
            if world_size > 1 and rank == 0:
                torch.distributed.barrier()
        train = train_loader(
            DetectionDataset(self.splits.train, transform, self.in_channels, proposals),
            cfg.batch_size,
            generator,
            collate_detection,
            workers=cfg.workers,
            pin_memory=device.type == "cuda",
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
        )
        return train, self.splits.val, None

    def after_training(
        self, model: Detector, device: torch.device, say: Callable[[str], None]
    ) -> str | None:
        """A model that fits after training (R-CNN: its SVMs and box regressors) fits on
        the training images as it sees them at test time, with their proposals, unless its
        ``fitted`` says these weights have them already (a finished run resumed)."""
        if model.fitted:
            return None
        say(f"fitting the SVMs and box regressors on {len(self.splits.train)} training images")
        paths = [sample.path for sample in self.splits.train]
        source = proposal_source_of(model)
        proposals = None if source is None else source.boxes(paths, progress=False)
        transform = detect_eval(self.img_size, self.mean, self.std)
        data = DetectionDataset(self.splits.train, transform, self.in_channels, proposals)
        batches = DataLoader(data, batch_size=PREDICT_BATCH, collate_fn=collate_detection)
        return model.fit_after_training(batches)

    @staticmethod
    def forward_loss(
        net: nn.Module, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, None]:
        return net(images, targets)["loss"], None

    def evaluate(
        self,
        model: nn.Module,
        data: list[DetectionSample],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        score_threshold: float = EVAL_LIMITS.score_threshold,
        pr_curves: bool = False,
    ) -> dict:
        """``mean_average_precision`` of the model's detections on the samples' images."""
        if score_threshold > _UNDERSTATED_ABOVE:
            log.warning(
                "score threshold %g drops low-scoring detections, so mAP will be understated;"
                " evaluate with %g",
                score_threshold,
                EVAL_LIMITS.score_threshold,
            )
        source = proposal_source_of(model)
        proposals = None if source is None else source.boxes([s.path for s in data])
        found, limits = [], EVAL_LIMITS.with_score(score_threshold)
        for chunk in chunks(data, PREDICT_BATCH):
            images = [read_image(sample.path, self.in_channels) for sample in chunk]
            given = None if proposals is None else [proposals[s.path] for s in chunk]
            found += self.detect(model, images, device, limits, proposals=given)
        return mean_average_precision(found, data, self.classes, pr_curves)

    def finish(
        self,
        model: nn.Module,
        val: list[DetectionSample],
        test: None,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        run_dir: Path,
    ) -> tuple[str, dict]:
        """The val report, pr_curve.png (per class) and val_predictions.png (the first val
        images: their labelled boxes beside the boxes found)."""
        from cnnlab import evaluation_plots, plots
        from cnnlab.draw import draw_boxes

        result = self.evaluate(model, val, device, autocast_dtype, pr_curves=True)
        evaluation_plots.plot_pr_curves(
            result["_pr"], result["per_class_ap50"], run_dir / "pr_curve.png"
        )
        shown = val[:VAL_PICTURES]
        images = [read_image(sample.path, self.in_channels) for sample in shown]
        pictures = []
        found_all = self.predict(model, images, device)
        for sample, image, found in zip(shown, images, found_all, strict=True):
            truth = [
                {"box": box, "class": self.classes[label]}
                for box, label in zip(sample.boxes, sample.labels, strict=True)
            ]
            pictures.append((draw_boxes(image, truth, self.classes), f"{sample.path.name}: labels"))
            boxes = found["detections"]
            caption = f"found {len(boxes)} (score >= {PREDICT_LIMITS.score_threshold})"
            pictures.append((draw_boxes(image, boxes, self.classes), caption))
        plots.plot_pictures(pictures, run_dir / "val_predictions.png", "validation images")
        return "val", result

    @staticmethod
    def headline(report: dict) -> str:
        return (
            f"{measured_on(report)} mAP@[.5:.95] {report['map']:.3f}  mAP@0.5"
            f" {report['map50']:.3f}  mAP@0.75 {report['map75']:.3f}  ({report['n_images']} images)"
        )

    def batch_pictures(
        self, images: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, str]]:
        """(uint8 image with its boxes, how many) for each image of a training batch, as
        batch.png shows them."""
        from cnnlab.draw import draw_boxes, unnormalise

        pictures = []
        for image, target in zip(images, targets, strict=False):
            boxes = [
                {"box": box, "class": self.classes[label]}
                for box, label in zip(
                    target["boxes"].tolist(), target["labels"].tolist(), strict=True
                )
            ]
            drawn = draw_boxes(unnormalise(image, self.mean, self.std), boxes, self.classes)
            pictures.append((drawn, f"{len(boxes)} object{'s' if len(boxes) != 1 else ''}"))
        return pictures

    @staticmethod
    def details(report: dict) -> list[str]:
        """The AP@0.5 of each class, lowest first."""
        return [per_class_line("AP@0.5 per class", report["per_class_ap50"], ".3f")]

    # -- a finished run

    @torch.inference_mode()
    def detect(
        self,
        model: nn.Module,
        images: list[Tensor],
        device: torch.device,
        limits: DetectLimits = PREDICT_LIMITS,
        proposals: list | None = None,
    ) -> list[dict[str, Tensor]]:
        """``model.detect`` under ``limits`` on uint8 images (in_channels, H, W) of any size,
        each resized to the square input the model was trained at, with the boxes mapped back
        to the image's own pixels: ``[{"boxes" (N, 4), "scores" (N,), "labels" (N,)}]`` on the CPU.
        A proposal-based model takes ``proposals`` (boxes (M, 4) in each image's pixels);
        without them selective search runs on each image."""
        model.eval()
        proposals = _proposals(model, images, proposals)
        results = []
        for start, chunk in zip(
            range(0, len(images), PREDICT_BATCH), chunks(images, PREDICT_BATCH), strict=True
        ):
            batch = torch.stack([self.preprocess(image) for image in chunk]).to(device)
            side = batch.shape[-1]
            options = {}
            if proposals is not None:
                given = proposals[start : start + len(chunk)]
                options["proposals"] = _input_proposals(chunk, given, side, device)
            found = model.detect(batch, limits, **options)
            for image, detections in zip(chunk, found, strict=True):
                scale = _whwh(image, device) / side
                results.append(
                    {
                        "boxes": (detections["boxes"] * scale).cpu(),
                        "scores": detections["scores"].cpu(),
                        "labels": detections["labels"].cpu(),
                    }
                )
        return results

    def scored_boxes(
        self,
        model: Detector,
        image: Tensor,
        device: torch.device,
        limits: DetectLimits = PREDICT_LIMITS,
    ) -> tuple[dict[str, Tensor], Tensor, nn.Module]:
        """One uint8 image's detections as ``detect`` finds them (boxes in the image's own
        pixels, on the CPU), the model's input ``x`` (1, C, S, S) and the module mapping
        inputs like ``x`` to each detection's score (``Detector.scored_detections``)."""
        model.eval()
        proposals = _proposals(model, [image], None)
        x = self.preprocess(image)[None].to(device)
        options = {}
        if proposals is not None:
            options["proposals"] = _input_proposals([image], proposals, x.shape[-1], device)
        found, scorer = model.scored_detections(x, limits, **options)
        scale = _whwh(image, device) / x.shape[-1]
        detections = {
            "boxes": (found[0]["boxes"] * scale).cpu(),
            "scores": found[0]["scores"].cpu(),
            "labels": found[0]["labels"].cpu(),
        }
        return detections, x, scorer

    def preprocess(self, image: Tensor) -> Tensor:
        """The model's float input (C, S, S) for a uint8 image (in_channels, H, W), as
        ``detect`` makes it: resized to the square training size and normalised."""
        return detect_eval(self.img_size, self.mean, self.std)(image)

    def split_images(self, split_file: Path, split: str) -> list[Path]:
        """The image files of the run's own ``split``."""
        return [sample.path for sample in getattr(DetectionSplits.from_json(split_file), split)]

    def predict(
        self,
        model: nn.Module,
        images: list[Tensor],
        device: torch.device,
        score_threshold: float = PREDICT_LIMITS.score_threshold,
    ) -> list[dict]:
        """``[{"detections": [{"class", "score", "box": [x1, y1, x2, y2]}]}]`` per image,
        boxes in its own pixels, at most ``PREDICT_LIMITS.max_detections``."""
        results = []
        limits = PREDICT_LIMITS.with_score(score_threshold)
        for found in self.detect(model, images, device, limits):
            detections = [
                {"class": self.classes[label], "score": score, "box": box}
                for box, score, label in zip(
                    found["boxes"].tolist(),
                    found["scores"].tolist(),
                    found["labels"].tolist(),
                    strict=True,
                )
            ]
            results.append({"detections": detections})
        return results

    def eval_data(
        self, split_file: Path, data_dir: Path | None, split: str
    ) -> list[DetectionSample]:
        """The run's own ``split`` (train or val), or every image of ``data_dir`` (its
        ``split`` part when it has one)."""
        if data_dir is None:
            if split not in ("train", "val"):
                raise CnnlabError(f"{split_file}: a detection run has train and val splits only")
            return getattr(DetectionSplits.from_json(split_file), split)
        folder = split_folder(Path(data_dir), split)
        _, classes, samples = read_detection_folder(folder)
        if classes != self.classes:
            raise CnnlabError(f"{folder}: classes {classes} differ from the run's {self.classes}")
        return samples

    @staticmethod
    def describe(result: dict) -> str:
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in result["detections"])
        return found or "nothing"

    @staticmethod
    def csv_rows(result: dict) -> list[tuple]:
        """One row per box, in ``csv_columns`` order; none for an image with no boxes."""
        return [(result["file"], d["class"], d["score"], *d["box"]) for d in result["detections"]]

    def draw(self, image: Tensor, result: dict) -> dict[str, bytes]:
        """PNGs to save, by name: the image with each box and "class score"
        (``cnnlab.draw``)."""
        from cnnlab.draw import draw_boxes, encode_png

        return {"drawing": encode_png(draw_boxes(image, result["detections"], self.classes))}


TASK = DetectTask


def _whwh(image: Tensor, device: torch.device) -> Tensor:
    height, width = image.shape[-2:]
    return torch.tensor([width, height, width, height], dtype=torch.float32, device=device)


def _proposals(model: nn.Module, images: list[Tensor], given: list | None) -> list | None:
    """The proposals of a proposal-based model for ``images`` (in their own pixels):
    ``given``, else selective search on each image; None for a model that finds its own."""
    source = proposal_source_of(model)
    if source is None or given is not None:
        return None if source is None else given
    from cnnlab.data.proposals import selective_search

    return [selective_search(image, source.mode, source.max_boxes) for image in images]


def _input_proposals(
    images: list[Tensor], proposals: list, side: int, device: torch.device
) -> list[Tensor]:
    """Each image's proposals scaled from its own pixels to the model's square input."""
    return [
        torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(device)
        * (side / _whwh(image, device))
        for image, boxes in zip(images, proposals, strict=True)
    ]


def proposal_source(model: str, model_args: dict, workers: int = 1):
    """Where a proposal-based model (Fast R-CNN, SPPNet) built from these settings gets its
    proposals (``cnnlab.data.proposals.ProposalSource``); None for the others."""
    options = {**model_info(model).options, **(model_args or {})}
    if "proposal_mode" not in options:
        return None
    from cnnlab.data.proposals import ProposalSource

    return ProposalSource(
        options["proposal_mode"],
        options["max_proposals"],
        options["proposal_file"],
        max(1, workers),
    )


def proposal_source_of(model: nn.Module):
    """The ``ProposalSource`` of a detector (``Detector.proposal_settings``; an exported
    one's is None), None for a model that finds its own boxes."""
    settings = model.proposal_settings
    if settings is None:
        return None
    from cnnlab.data.proposals import ProposalSource

    return ProposalSource(settings["mode"], settings["max_boxes"], settings["file"])
