"""Image classification, one class per image: cross-entropy, top-1/top-5, best checkpoint by
val top-1; top-k prediction and the test report of a finished run. ``ClassifyTask`` is the
task's class: it picks the multi-label mode (multilabel.py) when the data or the run has
several labels per image; what both modes share is in classify_base.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cnnlab import evaluation_plots, metrics
from cnnlab.checkpoint import ModelMeta
from cnnlab.config import TrainConfig
from cnnlab.errors import CnnlabError
from cnnlab.files import read_yaml
from cnnlab.tasks.classify_base import (
    EVAL_BATCH,
    ClassifyBase,
    logits_batches,
    training_splits,
)
from cnnlab.tasks.common import chunks, measured_on
from cnnlab.tasks.multilabel import MultiLabelClassifyTask
from cnnlab.tasks.spec import Figure, MetricSpec
from cnnlab.tasks.tta import TTA

TTA_ZOOM = 0.9  # the centre part TTA enlarges: inside every training crop's scale range
WORST_IMAGES = 16  # highest-loss test images kept for errors.png


@dataclass
class ClassifyTask(ClassifyBase):
    """Classification for the training loop (``cnnlab.engine.task.TrainingTask``) and for a
    finished run (``cnnlab.tasks.inference.InferenceTask``); ``setup`` and ``from_meta``
    return the multi-label mode (``MultiLabelClassifyTask``) where it applies."""

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
    csv_columns: ClassVar[tuple[str, ...]] = ("file", "rank", "class", "prob")  # --save-csv
    exported_logits: ClassVar[str | None] = "images"  # export: (N, K), one row per image

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> ClassifyBase:
        """The task of a finished run: the multi-label mode, with its fitted thresholds,
        when model.json records thresholds."""
        if meta.thresholds is not None:
            return MultiLabelClassifyTask.from_meta(meta)
        return super().from_meta(meta)

    # -- training

    @classmethod
    def setup(
        cls, cfg: TrainConfig, split_file: Path | None = None
    ) -> tuple[TrainConfig, ClassifyBase]:
        """Image size from the model, the stratified split, channels from the images; the
        multi-label mode with ``--multi-label`` or a label CSV naming several labels for an
        image."""
        cfg, splits = training_splits(cfg, split_file)
        mode = MultiLabelClassifyTask if cfg.multi_label or splits.multi_label else cls
        return mode.for_splits(cfg, splits)

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
        evaluation_plots.plot_confusion(
            result["_confusion"], self.classes, run_dir / "confusion.png"
        )
        worst = result["_worst"]
        evaluation_plots.plot_errors(
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
