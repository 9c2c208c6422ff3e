"""Prediction speed of YOLOv1 against Faster R-CNN on the same backbone and image size.

Both detectors are built fresh (or loaded from run folders with --yolo-run/--rcnn-run) and
timed in the same process, interleaved, on the same random batches: ``model.detect`` in
eval mode under inference_mode, NMS and decoding included, the way ``detect_predict`` runs
them. Faster R-CNN keeps its paper settings (300 proposals per image at test). The ratio
is YOLOv1's images/s over Faster R-CNN's; the paper reports 45 fps against 7 fps (6.4x)
with their own, different backbones on a GPU.

    python benchmarks/detect_speed.py                    # 448x448 and 128x128, resnet18
    python benchmarks/detect_speed.py --format json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import cnnlab.models.rcnn
import cnnlab.models.yolo  # noqa: F401  (register the detectors)
from cnnlab import create_model


def images_per_second(models: dict[str, nn.Module], batch: torch.Tensor, repeats: int) -> dict:
    """Median images/s per model, timed in alternation so that both see the same load."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: allocator, kernels, thread pool
            model.detect(batch, score_threshold=0.25)
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model.detect(batch, score_threshold=0.25)
                times[name].append(time.perf_counter() - started)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    if args.yolo_run and args.rcnn_run:
        from cnnlab.detect import load_detector

        yolo = load_detector(args.yolo_run, "cpu").model
        rcnn = load_detector(args.rcnn_run, "cpu").model
    else:
        torch.manual_seed(0)
        yolo = create_model("yolov1", num_classes=args.classes, backbone=args.backbone)
        rcnn = create_model("fasterrcnn", num_classes=args.classes, backbone=args.backbone)
    return {"yolov1": yolo.eval(), "fasterrcnn": rcnn.eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 128])
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--yolo-run", help="time a trained YOLOv1 run instead (with --rcnn-run)")
    parser.add_argument("--rcnn-run", help="time a trained Faster R-CNN run instead")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()

    models = build(args)
    rows = []
    for size in args.sizes:
        torch.manual_seed(size)
        batch = torch.rand(args.batch, 3, size, size)
        speed = images_per_second(models, batch, args.repeats)
        rows.append(
            {
                "name": f"predict {args.backbone} {size}x{size} batch {args.batch}",
                "ours": round(speed["yolov1"], 2),
                "baseline": round(speed["fasterrcnn"], 2),
                "unit": "images/s (ours: yolov1, baseline: fasterrcnn)",
                "ratio": round(speed["yolov1"] / speed["fasterrcnn"], 2),
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'benchmark':<36} {'yolov1 img/s':>13} {'fasterrcnn img/s':>17} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['name']:<36} {row['ours']:>13.2f} {row['baseline']:>17.2f} {row['ratio']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
