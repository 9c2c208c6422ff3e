"""Semantic segmentation: per-pixel cross-entropy with an ignore index, mIoU from one
confusion matrix over the whole set, best checkpoint by validation mIoU; masks and the
validation report of a finished run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from cnnlab.config import TrainConfig, check_task_settings
from cnnlab.data import segment as segdata
from cnnlab.data.images import detect_in_channels, image_size, read_image
from cnnlab.data.loaders import eval_loader, train_loader
from cnnlab.data.segment import IGNORE_INDEX, SegSplits
from cnnlab.data.splits import split_folder
from cnnlab.data.transforms import default_stats, segment_eval, segment_train
from cnnlab.errors import CnnlabError
from cnnlab.registry import check_input_size
from cnnlab.tasks import TASKS
from cnnlab.tasks.common import RunFacts, measured_on, per_class_line
from cnnlab.tasks.options import Option
from cnnlab.tasks.spec import Figure, MetricSpec

EVAL_BATCH = 8
VAL_PICTURES = 5  # validation images drawn into the run folder, three tiles each


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) pixel counts, rows the true class and columns the predicted one; pixels whose
    target is the ignore index (255) are left out. Inputs: same-shape integer tensors."""
    valid = targets != IGNORE_INDEX
    index = targets[valid] * num_classes + preds[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, classes: list[str]) -> dict:
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


@dataclass
class SegmentTask(RunFacts):
    """Segmentation for the training loop (``cnnlab.engine.task.TrainingTask``) and for a
    finished run (``cnnlab.tasks.inference.InferenceTask``)."""

    name: ClassVar[str] = "segment"
    options: ClassVar[tuple[Option, ...]] = TASKS["segment"].options
    metrics: ClassVar[MetricSpec] = MetricSpec(
        val=(
            Figure("loss", "loss"),
            Figure("pixel_acc", "pixel acc", True),
            Figure("miou", "mIoU", True),
        ),
        # Higher is better: val mIoU, then (on a tie) the lower val loss.
        best=("miou", "-loss"),
        best_label="val mIoU",
        curves={
            "loss": ("train_loss", "val_loss"),
            "pixel accuracy": ("train_pixel_acc", "val_pixel_acc"),
            "validation mIoU": ("val_miou",),
        },
        in_line=("loss", "miou"),
        train=Figure("pixel_acc", "pixel acc", True),
    )
    channels_last: ClassVar[bool] = False
    drawings: ClassVar[tuple[str, ...]] = ("mask", "overlay")  # what ``draw`` returns, in order
    csv_columns: ClassVar[tuple[str, ...]] = ("file", "class", "fraction")  # --save-csv
    eval_split: ClassVar[str] = TASKS["segment"].eval_split  # what `cnnlab eval RUN` reports on
    exported_logits: ClassVar[str | None] = "pixels"  # export: (N, K, H, W) at any H, W

    # -- training

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, SegmentTask]:
        """The split, masks checked against their images, the crop size (default: the
        shorter side of the first training image) and the channels."""
        check_task_settings(cfg, "segment")
        if split_file is None:
            splits = segdata.make_seg_splits(cfg.data, cfg.val_split, cfg.seed)
            if len(splits.classes) > IGNORE_INDEX:
                raise CnnlabError(f"{splits.root}/classes.txt: at most {IGNORE_INDEX} classes")
            segdata.check_pairs(splits.train + splits.val, len(splits.classes))
        else:
            splits = SegSplits.from_json(split_file)
        img_size = cfg.img_size or min(image_size(splits.train[0][0]))
        in_channels = cfg.in_channels or detect_in_channels([image for image, _ in splits.train])
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
    ) -> tuple[DataLoader, DataLoader, None]:
        """Random crops for training; whole images, in order, for validation."""
        k = len(self.classes)
        train_tf = segment_train(self.img_size, cfg.augment, cfg.flip, self.mean, self.std)
        train_set = segdata.SegmentationDataset(self.splits.train, train_tf, k, self.in_channels)
        train = train_loader(
            train_set,
            cfg.batch_size,
            generator,
            segdata.collate_pad,
            workers=cfg.workers,
            pin_memory=device.type == "cuda",
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
        )
        val_set = segdata.SegmentationDataset(
            self.splits.val, segment_eval(self.mean, self.std), k, self.in_channels
        )
        val = eval_loader(val_set, train.batch_size, segdata.collate_pad, workers=cfg.workers)
        return train, val, None

    def forward_loss(
        self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Mean cross-entropy over labelled pixels (outputs (B, K, H, W), targets (B, H, W))
        and the batch's (right pixels, labelled pixels)."""
        outputs = net(images)
        loss = F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)
        labelled = targets != IGNORE_INDEX
        return loss, (((outputs.argmax(dim=1) == targets) & labelled).sum(), labelled.sum())

    @torch.inference_mode()
    def evaluate(
        self,
        model: nn.Module,
        data: DataLoader,
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
        for images, targets in data:  # (B, C, H, W), (B, H, W)
            images, targets = images.to(device), targets.to(device)
            enabled = autocast_dtype is not None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
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

    def finish(
        self,
        model: nn.Module,
        val: DataLoader,
        test: None,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        run_dir: Path,
    ) -> tuple[str, dict]:
        """The val report and val_predictions.png: for each of the first val images, the
        image with the predicted classes outlined, the labelled class map and the predicted
        one (solid class colours, never blended with the image)."""
        from cnnlab import plots
        from cnnlab.draw import class_map, legible, mask_colour, outline_classes

        result = self.evaluate(model, val, device, autocast_dtype)
        shown = self.splits.val[:VAL_PICTURES]
        images = [read_image(image, self.in_channels) for image, _ in shown]
        pictures = []
        for (path, mask_path), image, found in zip(
            shown, images, self.predict(model, images, device), strict=True
        ):
            truth = segdata.read_mask(mask_path, len(self.classes))
            labelled = truth != IGNORE_INDEX
            truth = torch.where(labelled, truth, 0)  # unlabelled pixels shown as background
            predicted = found["_mask"].long()
            accuracy = (predicted == truth)[labelled].float().mean().item()
            enlarged, factor = legible(image)  # whole factors: the tiles stay pixel-exact
            truth, predicted = (
                m.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
                for m in (truth, predicted)
            )
            pictures.append((outline_classes(enlarged, predicted), f"{path.name}, predicted"))
            pictures.append((class_map(truth), "labels"))
            pictures.append((class_map(predicted), f"predicted ({accuracy:.0%} of pixels)"))
        legend = [(name, mask_colour(k)) for k, name in enumerate(self.classes) if k > 0]
        plots.plot_pictures(pictures, run_dir / "val_predictions.png", "validation images",
                            columns=3, legend=legend)  # fmt: skip
        return "val", result

    @staticmethod
    def headline(report: dict) -> str:
        return (
            f"{measured_on(report)} mIoU {report['miou']:.2%}  pixel accuracy"
            f" {report['pixel_acc']:.2%}  ({report['n']} images)"
        )

    def batch_pictures(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> list[tuple[torch.Tensor, str]]:
        """(uint8 image with its classes outlined beside its class map, the classes in it)
        for each image of a training batch, as batch.png shows them (padding, labelled 255,
        is shown as background)."""
        from cnnlab.draw import draw_mask, unnormalise

        pictures = []
        for image, mask in zip(images, targets, strict=False):
            shown = torch.where(mask == IGNORE_INDEX, 0, mask)
            present = sorted(set(shown.unique().tolist()) - {0})
            names = ", ".join(self.classes[k] for k in present) or "background only"
            shown_image = unnormalise(image, self.mean, self.std)
            pictures.append((draw_mask(shown_image, shown, self.classes), names))
        return pictures

    @staticmethod
    def details(report: dict) -> list[str]:
        """The IoU of each class, lowest first."""
        return [per_class_line("IoU per class", report["per_class_iou"], ".1%")]

    # -- a finished run

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, images: list[torch.Tensor], device: torch.device
    ) -> list[dict]:
        """``[{"class_fractions": {name: fraction}, "_mask": uint8 (H, W)}]`` per uint8
        image (in_channels, H, W), each segmented whole at its own size."""
        results = []
        for image in images:
            # each image is segmented at its own size: one too small for the model's
            # pooling is refused in a line (InputSizeError), not by a torch error
            check_input_size(model, *image.shape[-2:], what="images")
            logits = model(self.preprocess(image).unsqueeze(0).to(device))  # (1, K, H, W)
            mask = logits.argmax(dim=1)[0].to(torch.uint8).cpu()  # (H, W)
            counts = torch.bincount(mask.flatten().long(), minlength=len(self.classes))
            fractions = (counts.double() / mask.numel()).tolist()
            results.append(
                {
                    "class_fractions": dict(zip(self.classes, fractions, strict=True)),
                    "_mask": mask,
                }
            )
        return results

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """The model's float input (C, H, W) for a uint8 image (in_channels, H, W), as
        ``predict`` and evaluation make it: normalised, at its own size."""
        transform = segment_eval(self.mean, self.std)
        return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)

    def split_images(self, split_file: Path, split: str) -> list[Path]:
        """The image files of the run's own ``split``."""
        return [image for image, _ in getattr(SegSplits.from_json(split_file), split)]

    def eval_data(self, split_file: Path, data_dir: Path | None, split: str) -> DataLoader:
        """The run's own ``split`` (train or val) or every image/mask pair of ``data_dir``
        (its ``split`` part when it has one)."""
        if data_dir is None:
            if split not in ("train", "val"):
                raise CnnlabError(f"{split_file}: a segmentation run has train and val splits only")
            samples = getattr(SegSplits.from_json(split_file), split)
        else:
            root = Path(data_dir)
            found = segdata.read_classes(root)
            if found != self.classes:
                raise CnnlabError(
                    f"{root / 'classes.txt'}: classes {found} differ from the run's {self.classes}"
                )
            samples = segdata.scan_pairs(split_folder(root, split))
            segdata.check_pairs(samples, len(self.classes))
        dataset = segdata.SegmentationDataset(
            samples, segment_eval(self.mean, self.std), len(self.classes), self.in_channels
        )
        return eval_loader(dataset, EVAL_BATCH, segdata.collate_pad)

    @staticmethod
    def describe(result: dict) -> str:
        """Where the mask went, once written; else the classes' shares of the pixels."""
        if "mask" in result:
            return f"mask {result['mask']}, overlay {result['overlay']}"
        shown = sorted(result["class_fractions"].items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {fraction:.1%}" for name, fraction in shown if fraction > 0)

    @staticmethod
    def csv_rows(result: dict) -> list[tuple]:
        """One row per class (absent ones with 0), in ``csv_columns`` order."""
        return [(result["file"], name, share) for name, share in result["class_fractions"].items()]

    def draw(self, image: torch.Tensor, result: dict) -> dict[str, bytes]:
        """PNGs to save, by name: the mask (each pixel's value its class index, shown in the
        class colours) and the "overlay": the image with each class outlined beside the
        class map, above a legend (``cnnlab.draw.draw_mask``)."""
        from cnnlab.draw import draw_mask, encode_png, mask_png

        mask = result["_mask"]
        return {
            "mask": mask_png(mask),
            "overlay": encode_png(draw_mask(image, mask, self.classes)),
        }


TASK = SegmentTask
