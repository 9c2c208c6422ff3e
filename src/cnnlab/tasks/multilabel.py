"""Multi-label classification, a mode of the classify task (``--multi-label``, or a label
CSV whose cells hold several labels): one sigmoid score per label, binary cross-entropy,
the best checkpoint by val mAP, and each label's threshold fitted on the validation split
after training and saved in model.json. ``ClassifyTask`` (classify.py) picks this mode."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cnnlab import evaluation_plots, metrics
from cnnlab.checkpoint import ModelMeta, read_model_json, save_model_json
from cnnlab.config import TrainConfig
from cnnlab.data.classify import Splits, as_multi_label
from cnnlab.data.labels import Sample, as_multi_label_samples, multi_hot
from cnnlab.errors import CnnlabError
from cnnlab.tasks.classify_base import EVAL_BATCH, ClassifyBase, logits_batches
from cnnlab.tasks.common import chunks, measured_on, per_class_line
from cnnlab.tasks.spec import Figure, MetricSpec


@dataclass
class MultiLabelClassifyTask(ClassifyBase):
    """Multi-label classification, the mode ``ClassifyTask`` picks (``--multi-label``, or a
    label CSV whose cells hold several labels): one sigmoid score per label, binary cross-entropy,
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

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> MultiLabelClassifyTask:
        """The task of a finished run, with the thresholds model.json records."""
        task = super().from_meta(meta)
        task.thresholds = None if meta.thresholds is None else list(meta.thresholds)
        return task

    @classmethod
    def for_splits(
        cls, cfg: TrainConfig, splits: Splits
    ) -> tuple[TrainConfig, MultiLabelClassifyTask]:
        """The task training on ``splits``, every label a tuple of class indices; the
        options that assume one class per image are refused."""
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
        return super().for_splits(cfg, as_multi_label(splits))

    def encode(self, samples: list[Sample]) -> list[Sample]:
        k = len(self.classes)
        return [(path, multi_hot(labels, k)) for path, labels in as_multi_label_samples(samples)]

    @staticmethod
    def right_answers(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many of the batch's images have every label right at 0.5 (exact matches):
        ``forward_loss`` is the one both modes share, with binary cross-entropy as ``loss``."""
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
        evaluation_plots.plot_per_class_pr(result["per_class"], run_dir / "per_class.png")
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
