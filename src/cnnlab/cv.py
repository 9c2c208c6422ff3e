"""Stratified K-fold cross-validation of a classifier (``cnnlab cv``): one run folder per
fold and the spread between them.

On a few hundred images one split can move accuracy by ten points; the folds say by how
much. The data is split once as ``train`` would split it (``cnnlab.data.classify``); the
test images stay held out and every fold's best weights are scored on them once, while
the train and val images are dealt into K stratified folds (``make_folds``): fold i
validates (early stopping, the best checkpoint) on part i and trains on the rest. With
no test split (``--test-split 0``) each fold is scored on its own validation part.

``OUT`` receives ``cv.yaml`` (the settings and K, what ``resume_cv`` continues from),
``splits/fold-I.json``, the run folders ``fold-I/`` (each a full run: ``cnnlab eval``,
``predict`` and ``export`` take it), then ``cv.json`` (per fold and mean ± std of top-1,
macro-F1 and loss, the summed confusion matrix) and ``confusion.png``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cnnlab import checkpoint, evaluation_plots, training
from cnnlab.config import TrainConfig
from cnnlab.data.classify import make_folds, make_splits
from cnnlab.errors import CnnlabError
from cnnlab.files import read_json, read_yaml, write_json, write_yaml
from cnnlab.runs import load_run

FIGURES = ("top1", "macro_f1", "loss")  # what cv.json summarises per fold
CV_CONFIG = "cv.yaml"


def cross_validate(cfg: TrainConfig, folds: int, say: Callable[[str], None] = print) -> dict:
    """Train ``folds`` classifiers with ``cfg`` into the new folder ``cfg.out`` (a fold
    each) and return cv.json's summary; ``say`` receives a line as each fold starts."""
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CnnlabError(f"{out}: --out takes a new or empty folder (continue with --resume)")
    if training.task_of_model(cfg.model).name != "classify":
        raise CnnlabError(f"{cfg.model} is not a classifier; cv cross-validates classifiers")
    data = Path(cfg.data).absolute()
    # A label CSV's files are relative to --images (absolute, as each fold's config keeps it).
    images = Path(cfg.images).absolute() if cfg.images else None
    cfg = replace(cfg, images=str(images) if images else None)
    splits = make_splits(data, cfg.val_split, cfg.test_split, cfg.seed, images)
    if cfg.multi_label or splits.multi_label:
        # Its folds are scored by top-1 and summed into a confusion matrix: one class each.
        raise CnnlabError(f"{data}: cnnlab cv scores single-label classification only")
    parts = make_folds(splits, folds)  # refused before anything is written
    (out / "splits").mkdir(parents=True, exist_ok=True)
    for i, fold in enumerate(parts, start=1):
        write_json(_split_file(out, i), fold.to_json())
    write_yaml(out / CV_CONFIG, {"folds": folds, "config": asdict(replace(cfg, data=str(data)))})
    return _run_folds(out, say)


def resume_cv(out: str | Path, say: Callable[[str], None] = print) -> dict:
    """Continue the cross-validation in ``out`` fold by fold: finished folds are kept, an
    interrupted one resumes from its last epoch, the rest train."""
    out = Path(out)
    if not (out / CV_CONFIG).is_file():
        raise CnnlabError(f"{out} holds no cross-validation (no {CV_CONFIG})")
    return _run_folds(out, say)


def _split_file(out: Path, fold: int) -> Path:
    return out / "splits" / f"fold-{fold}.json"


def _saved(out: Path) -> tuple[TrainConfig, int]:
    saved = read_yaml(out / CV_CONFIG)
    try:
        return TrainConfig.from_dict(saved["config"]), int(saved["folds"])
    except (KeyError, TypeError, ValueError, CnnlabError) as error:
        raise CnnlabError(f"{out / CV_CONFIG}: not a cnnlab cv file ({error})") from None


def _run_folds(out: Path, say: Callable[[str], None]) -> dict:
    cfg, folds = _saved(out)
    started = time.perf_counter()
    rows, confusion, classes, scored_on = [], None, [], "test"
    for i in range(1, folds + 1):
        run = out / f"fold-{i}"
        if _finished(run, cfg.epochs):
            say(f"fold {i}/{folds}: done before, kept ({run})")
        elif checkpoint.is_run_dir(run):
            say(f"fold {i}/{folds}: resuming {run}")
            training.resume(run, "classify")
        else:
            say(f"fold {i}/{folds}: training into {run}")
            training.train(replace(cfg, out=str(run), split_file=str(_split_file(out, i))))
        row, matrix, classes, scored_on = _score_fold(run, cfg.device)
        rows.append({"fold": i, **row})
        confusion = matrix if confusion is None else confusion + matrix
    summary = {
        "folds": folds,
        "scored_on": scored_on,
        "data": cfg.data,
        "per_fold": rows,
        "mean": {key: statistics.fmean(row[key] for row in rows) for key in FIGURES},
        "std": {key: statistics.stdev(row[key] for row in rows) for key in FIGURES},
        "classes": classes,
        "confusion": confusion.tolist(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "cv.json", summary)
    evaluation_plots.plot_confusion(confusion, classes, out / "confusion.png")
    return summary


def _finished(run: Path, epochs: int) -> bool:
    """Whether a fold's run trained to its end: all its epochs, or stopped early. (Ctrl-C
    also leaves a report.json, on the best weights so far.)"""
    if not (run / "report.json").is_file():
        return False
    if "early_stop" in read_json(run / "report.json"):
        return True
    rows = (
        (run / "metrics.csv").read_text().splitlines()[1:]
        if (run / "metrics.csv").is_file()
        else []
    )
    return len([row for row in rows if row.strip()]) >= epochs


def _score_fold(run: Path, device: str) -> tuple[dict, torch.Tensor, list[str], str]:
    """A fold's figures on the held-out test split (its val part when there is none): top-1,
    macro-F1 (the mean of the classes' F1), loss, best epoch; its confusion matrix."""
    report = read_json(run / "report.json")
    loaded = load_run(run, device=device, fast=False)
    split = report["split"]
    data = loaded.task.eval_data(run / "split.json", None, split)
    result = loaded.task.evaluate(loaded.model, data, loaded.device)
    f1 = [scores["f1"] for scores in result["per_class"].values()]
    row = {
        "top1": result["top1"],
        "macro_f1": statistics.fmean(f1),
        "loss": result["loss"],
        "best_epoch": report["best_epoch"],
        "n": result["n"],
    }
    return row, result["_confusion"].long(), loaded.classes, split


def cv_table(summary: dict) -> str:
    """cv.json as a text table: a row per fold, then mean ± std."""
    head = f"{'fold':>6}  {'top-1':>8}  {'macro-F1':>8}  {'loss':>7}  {'best epoch':>10}"
    lines = [f"{summary['folds']}-fold cross-validation, scored on {summary['scored_on']}", head]
    for row in summary["per_fold"]:
        lines.append(
            f"{row['fold']:>6}  {row['top1']:>8.2%}  {row['macro_f1']:>8.3f}  {row['loss']:>7.4f}"
            f"  {row['best_epoch']:>10}"
        )
    mean, std = summary["mean"], summary["std"]
    lines.append(
        f"{'mean':>6}  {mean['top1']:>8.2%}  {mean['macro_f1']:>8.3f}  {mean['loss']:>7.4f}"
    )
    lines.append(f"{'± std':>6}  {std['top1']:>8.2%}  {std['macro_f1']:>8.3f}  {std['loss']:>7.4f}")
    return "\n".join(lines)
