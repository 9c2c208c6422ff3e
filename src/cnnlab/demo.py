"""`cnnlab demo`: the project's main jobs, from nothing to a trained, evaluated run.

classify (the default): the notes' ConvNet on the built-in digits. segment: FCN-8s on
synthetic shapes. detect: YOLOv1 on synthetic shapes. Each prints its headline figure on
stdout; progress goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cnnlab import checkpoint
from cnnlab.config import make_config
from cnnlab.training import resume, train

RUNS = Path("runs")

# The notes' ConvNet on the built-in digits. The settings are the demo's own choice, measured
# on this project's 2-core machine: 16x16 keeps the 8x8 originals' detail at a quarter of
# 32x32's cost; one hidden layer of 128 and light dropout generalise better than (1024, 128)
# on 1,259 training images; no flips (a flipped 2 is no digit); a 20% test split so that
# "99%" is measured on 359 images rather than 180. 20 epochs, as many as the bare loop of
# benchmarks/demo.py: seeds 0, 1 and 2 gave 99.16%, 99.44% and 99.44% test top-1 on one
# thread (seed 0 on two: 99.16%), in about 15 s of training (40 epochs gave 99.16% to
# 99.72% in twice the time). The moving average of the weights (ema 0.99, about the last
# 2.5 epochs) keeps the result off the last epochs' noise: without it one thread instead of
# two (the CPU rule's choice on a busy machine) once gave 98.33% instead of 99.72%.
DIGITS_DEMO = {
    "model": "convnet",
    "model_args": {"cdims": [32, 64], "hdims": [128], "dropout": 0.1},
    "img_size": 16,
    "epochs": 20,
    "batch_size": 32,
    "lr": 1e-3,
    "optimizer": "adamw",
    "augment": "light",
    "flip": False,
    "ema": 0.99,
    "val_split": 0.1,
    "test_split": 0.2,
    "seed": 0,
}
# FCN-8s on a ResNet-18 trained from scratch on 64x64 crops of 300 96x96 shapes images.
SHAPES_SEGMENT_DEMO = {
    "model": "fcn8s",
    "model_args": {"backbone": "resnet18"},
    "epochs": 15,
    "batch_size": 4,
    "lr": 2e-3,
    "img_size": 64,
    "augment": "none",
    "seed": 0,
}
# YOLOv1 (conv head, 8x8 grid) on 400 128x128 shapes images: mAP@0.5 0.83 in 2 min 43 s
# on an idle 2-core CPU; 0.72 with one thread, whose different float sums lead 15 short
# epochs elsewhere. Its model_args, the detection task's SHAPES_YOLO_ARGS, are added in
# shapes_demo: the classify demo does not import the detection task (nor runs.py), whose
# imports (torchvision's detection parts) cost it a second.
SHAPES_DETECT_DEMO = {
    "model": "yolov1",
    "epochs": 15,
    "img_size": 128,
}


def next_free_run(stem: str) -> Path:
    """runs/demo, then runs/demo2, runs/demo3, ...: a demo never overwrites an earlier run."""
    candidate, number = RUNS / stem, 1
    while candidate.exists():
        number += 1
        candidate = RUNS / f"{stem}{number}"
    return candidate


def digits_folder(size: int = 32) -> Path:
    """The digits as PNG class folders under runs/, written once and reused."""
    from cnnlab.data.digits import write_digits

    folder = RUNS / f"digits{size}"
    if not folder.exists():
        write_digits(folder, size=size)
    return folder


def run_demo(task: str = "classify", out: Path | None = None, quiet: bool = False) -> int:
    """Run one demo and print its headline figure; returns the exit status."""
    if task == "classify":
        run_dir = out or next_free_run("demo")
        data = digits_folder(DIGITS_DEMO["img_size"])
        print(f"training the notes' ConvNet on {data} (1,797 handwritten digits)", file=sys.stderr)
        cfg = make_config("classify", data=str(data), out=str(run_dir), quiet=quiet, **DIGITS_DEMO)
        report = train(cfg)
        print(f"test accuracy: {report['top1']:.2%} on {report['n']} held-out digits")
        pictures = "batch.png, curves.png, confusion.png, errors.png, report.json"
        print(f"run folder: {run_dir} ({pictures})")
        return 0
    report = shapes_demo(task, out or next_free_run(f"demo-{task}"), quiet=quiet)
    if task == "segment":
        print(f"FCN-8s on shapes: validation mIoU {report['miou']:.3f}")
    else:
        print(f"YOLOv1 on shapes: validation mAP@0.5 {report['map50']:.3f}")
    print(f"run folder: {report['run']}")
    return 0


def shapes_demo(
    task: str, out: str | Path, quiet: bool = False, n: int | None = None, **settings: Any
) -> dict:
    """Synthetic shapes for ``task`` ("segment" or "detect") into ``OUT/shapes``, a model
    trained on them into ``OUT/run`` (an unfinished one is resumed), and its validation
    report with ``run`` and ``seconds`` added. ``n`` images (default 300 for segment, 400
    for detect) and TrainConfig ``settings`` change the demo's own."""
    from cnnlab.data.shapes import write_shapes
    from cnnlab.runs import load_run
    from cnnlab.tasks.detect import SHAPES_YOLO_ARGS

    out = Path(out)
    started = time.perf_counter()
    data = out / "shapes"
    if task == "segment":
        demo, marker = SHAPES_SEGMENT_DEMO, data / "classes.txt"
        if not marker.is_file():
            write_shapes(data, task="segment", n=n or 300, size=96, seed=0)
    else:
        demo = {**SHAPES_DETECT_DEMO, "model_args": SHAPES_YOLO_ARGS}
        marker = data / "annotations.json"
        if not marker.is_file():
            write_shapes(data, task="detect", n=n or 400, size=128, seed=0)
    run_dir = out / "run"
    if not checkpoint.is_run_dir(run_dir):
        settings = {**demo, **settings}
        cfg = make_config(task, data=str(data), out=str(run_dir), quiet=quiet, **settings)
        train(cfg, task=task)
    elif not (run_dir / "report.json").is_file():
        resume(run_dir, task, quiet=quiet)
    report = load_run(run_dir).evaluate()
    return {**report, "run": str(run_dir), "seconds": round(time.perf_counter() - started, 1)}
