"""Detection accuracy on synthetic 128x128 shapes: Faster R-CNN, YOLOv1, R-CNN, Fast R-CNN
and SPPNet (resnet18, from scratch) trained within a wall-clock budget, scored by
validation mAP@0.5.

Targets (issues 6 and 12): Faster R-CNN mAP@0.5 >= 0.90, YOLOv1 >= 0.80, R-CNN, Fast R-CNN
and SPPNet >= 0.75, each within 20 minutes of training on a 2-core CPU. The recipes below
are what fits that budget there; the printed minutes include data loading, the per-epoch
validation and R-CNN's SVM fitting. The proposal-based models' selective search is not in
those minutes: it is computed once for all 800 images before the first of them trains (one
process, cached beside the data as ``cnnlab detect proposals`` does), and the minutes that
took, or for the others reading the cache, are printed apart as "proposal min"; training
only reads the cache. Training runs on one intra-op thread with data loading in one worker
process: on a 2-core machine shared with other jobs, two threads per process spin against
each other (a Faster R-CNN step measured 7.6 s with two threads against 1.9 s with one).
benchmarks/lineage.py reuses these runs (and ``recipe_at`` for larger shapes).

    python benchmarks/detect_shapes.py                       # all five models
    python benchmarks/detect_shapes.py --models fastrcnn sppnet --work /tmp/shapes
    python benchmarks/detect_shapes.py --models yolov1 --format json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import cnnlab
from cnnlab.data.detect import make_detection_splits
from cnnlab.data.shapes import write_shapes
from cnnlab.tasks.detect import SHAPES_YOLO_ARGS, proposal_source

TARGETS = {"fasterrcnn": 0.90, "yolov1": 0.80, "fastrcnn": 0.75, "sppnet": 0.75, "rcnn": 0.75}
BUDGET_MINUTES = 20.0
ROWS_FILE = "detect_shapes.json"  # in --work: every model's row of the last runs
IMAGES, VAL_SPLIT, SIZE = 800, 0.125, 128  # 700 training and 100 validation images
# Fast R-CNN and SPPNet: as Faster R-CNN's box head (a few objects an image, so 32 sampled
# RoIs, a quarter foreground, and fc6/fc7 256 wide: 256*49 -> 1024 from scratch would cost
# more than the backbone and overfit 700 images), and background sampled from every
# proposal below IoU 0.5, not only those in [0.1, 0.5): from scratch, a classifier that
# never saw a proposal on empty canvas scores those high at test time.
SHAPES_PROPOSAL_ARGS = {"representation_size": 256, "rois_per_image": 32, "background_iou_low": 0.0}
# R-CNN: every sampled proposal is a backbone forward pass, so the crops are small (objects
# are 22-56 px, so a 48 px crop with 6 px of context keeps most of their detail) and 16 a
# training image (a batch of 8 is the paper's 128 crops, 32 foreground).
SHAPES_RCNN_ARGS = {
    "crop_size": 48,
    "context_padding": 6,
    "representation_size": 256,
    "rois_per_image": 16,
}
RECIPES = {
    "fasterrcnn": {
        "epochs": 10,
        "batch_size": 8,
        "lr": 1e-3,
        "model_args": {
            # objects are 22-56 px wide at 128x128
            "anchor_sizes": [16, 32, 64],
            # 1-4 objects per image: a few hundred proposals and 32 sampled RoIs are
            # plenty, and the box head (256*7*7 inputs per RoI) would otherwise cost more
            # than the backbone
            "rpn_post_nms_top_n_train": 300,
            "rpn_post_nms_top_n_test": 100,
            "box_batch_size_per_image": 32,
            "representation_size": 256,
        },
    },
    "yolov1": {"epochs": 12, "batch_size": 16, "lr": 1e-3, "model_args": SHAPES_YOLO_ARGS},
    "fastrcnn": {"epochs": 12, "batch_size": 8, "lr": 1e-3, "model_args": SHAPES_PROPOSAL_ARGS},
    "sppnet": {"epochs": 12, "batch_size": 8, "lr": 1e-3, "model_args": SHAPES_PROPOSAL_ARGS},
    "rcnn": {"epochs": 6, "batch_size": 8, "lr": 1e-3, "model_args": SHAPES_RCNN_ARGS},
}


def save_rows(path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to the JSON list in ``path`` (benchmarks/lineage.py reads the training
    minutes there), replacing earlier rows of the same models."""
    kept = json.loads(path.read_text()) if path.is_file() else []
    done = {row["model"] for row in rows}
    path.write_text(json.dumps([r for r in kept if r["model"] not in done] + rows, indent=2))


def proposal_minutes(model: str, data: Path, seed: int) -> float | None:
    """Minutes to compute (or, once cached, read) the proposals of every image; None for a
    model that finds its own boxes."""
    source = proposal_source(model, RECIPES[model]["model_args"])
    if source is None:
        return None
    splits = make_detection_splits(data, VAL_SPLIT, seed)
    started = time.perf_counter()
    source.boxes([s.path for s in splits.train + splits.val], progress=False)
    return (time.perf_counter() - started) / 60


def recipe_at(model: str, size: int) -> dict:
    """The model's recipe for shapes at ``size`` (objects grow with the image): Faster
    R-CNN's anchors and YOLOv1's grid (a cell per stride-16 feature) grow with it; R-CNN
    keeps its 48 px crops, the others their settings."""
    recipe = copy.deepcopy(RECIPES[model])
    args = recipe["model_args"]
    if "anchor_sizes" in args:
        args["anchor_sizes"] = [round(a * size / SIZE) for a in args["anchor_sizes"]]
    if "grid" in args:
        args["grid"] = size // args["reduction"]
    return recipe


def run(model: str, data: Path, work: Path, seed: int, threads: int = 1, size: int = SIZE) -> dict:
    """Train ``model`` on the shapes in ``data`` (``size`` px) into ``work/model``; its row."""
    recipe = recipe_at(model, size)
    proposals = proposal_minutes(model, data, seed)
    started = time.perf_counter()
    report = cnnlab.train(
        data,
        work / model,
        task="detect",
        model=model,
        img_size=size,
        val_split=VAL_SPLIT,
        seed=seed,
        device="cpu",
        threads=threads,
        workers=1,
        **recipe,
    )
    minutes = (time.perf_counter() - started) / 60
    return {
        "model": model,
        "size": size,
        "map50": round(report["map50"], 4),
        "map": round(report["map"], 4),
        "target_map50": TARGETS[model],
        "minutes": round(minutes, 1),
        "proposal_minutes": None if proposals is None else round(proposals, 2),
        "passed": report["map50"] >= TARGETS[model] and minutes <= BUDGET_MINUTES,
        "epochs": recipe["epochs"],
        "best_epoch": report["best_epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: temp)")
    # The recipes were tuned on seed-0 data; the default measures them on unseen images.
    parser.add_argument("--seed", type=int, default=1, help="seed of the shapes data")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnlab-detect-shapes-"))
    data = work / "shapes"
    if not (data / "annotations.json").is_file():
        write_shapes(data, task="detect", n=IMAGES, size=SIZE, seed=args.seed)
    for model in args.models:
        shutil.rmtree(work / model, ignore_errors=True)
    rows = [run(model, data, work, args.seed, args.threads) for model in args.models]
    save_rows(work / ROWS_FILE, rows)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'model':<12} {'mAP@0.5':>8} {'target':>7} {'mAP':>7} {'minutes':>8}"
        f" {'proposal min':>12}  result"
    )
    for r in rows:
        verdict = "met" if r["passed"] else "NOT met"
        extra = "-" if r["proposal_minutes"] is None else f"{r['proposal_minutes']:.2f}"
        print(
            f"{r['model']:<12} {r['map50']:>8.3f} {r['target_map50']:>7.2f} {r['map']:>7.3f}"
            f" {r['minutes']:>8.1f} {extra:>12}  {verdict}"
        )


if __name__ == "__main__":
    main()
