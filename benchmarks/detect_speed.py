"""Prediction speed of YOLOv1 against Faster R-CNN on the same backbone and image size, and
where each spends its time.

All detectors are built fresh (or loaded from run folders with --yolo-run/--rcnn-run) and
timed in the same process, interleaved (the order reversed every other round), on the same
random batches: ``model.detect`` in eval mode under inference_mode, NMS and decoding
included, the way ``detect_predict`` runs them. Each keeps its library defaults; Faster
R-CNN keeps the paper's 300 proposals per image at test and torchvision's 1024-wide box
head. The ratio is YOLOv1's images/s over Faster R-CNN's.

A second Faster R-CNN row gives the box head the width of the paper's VGG-16 fc6/fc7
(``representation_size=4096``), the one part of the paper's detector that a shared backbone
does not carry over. Each row also gives both models' multiply-adds per image
(``cnnlab.inspect.summarize``) and where the time goes, from forward hooks in the timed
calls: the backbone, the RPN's conv and its proposal step (anchors, decoding, NMS),
RoIAlign, the box head and the final box decoding + NMS; what no hook covers (YOLOv1's
decoding + NMS, Faster R-CNN's batching and label shift) is the rest.

The paper's 45 against 7 fps (6.4x) compares different backbones on different image sizes
on a GPU; benchmarks/README.md works through why the ratio here is smaller.

    python benchmarks/detect_speed.py                    # 448x448 and 128x128, resnet18
    python benchmarks/detect_speed.py --threads 1         # on a shared machine
    python benchmarks/detect_speed.py --format json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from _bench import add_load_flag, busy_loops, interleaved, load_title, machine_line, rate_row
from cnnlab import create_model
from cnnlab.inspect import summarize
from cnnlab.models.detection import PREDICT_LIMITS

# Stage -> (module paths whose time adds, nested module paths whose time is taken off).
# Stages partition the hooked top-level modules, so total - their sum is the rest.
YOLO_STAGES = {
    "backbone": (["backbone"], []),
    "neck + head": (["neck", "head"], []),
}
RCNN_STAGES = {
    "backbone": (["backbone"], []),
    "RPN conv": (["rpn.head"], []),
    "proposals": (["rpn"], ["rpn.head"]),
    "RoIAlign": (["roi_heads.box_roi_pool"], []),
    "box head": (["roi_heads.box_head", "roi_heads.box_predictor"], []),
    "box decode + NMS": (
        ["roi_heads"],
        ["roi_heads.box_roi_pool", "roi_heads.box_head", "roi_heads.box_predictor"],
    ),
}


def stages_of(model: nn.Module) -> dict[str, tuple[list[str], list[str]]]:
    return YOLO_STAGES if hasattr(model, "neck") else RCNN_STAGES


def rest_of(model: nn.Module) -> str:
    """What the time outside the hooked modules is spent on."""
    return "decode + NMS" if hasattr(model, "neck") else "batching, labels"


class StageClock:
    """Wall time each hooked submodule spends in one ``detect`` call, and the RoIs the box
    head sees (Faster R-CNN's cost grows with them, not with the image)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stages = stages_of(model)
        self.rest = rest_of(model)
        paths = {p for add, sub in self.stages.values() for p in add + sub}
        self.calls: list[dict[str, float]] = []
        self.rois: list[float] = []
        self._started: dict[str, float] = {}
        self._spent: dict[str, float] = {}
        self._hooks = []
        for path in paths:
            module = model.get_submodule(path)
            self._hooks.append(module.register_forward_pre_hook(self._enter(path)))
            self._hooks.append(module.register_forward_hook(self._leave(path)))
        if "roi_heads.box_roi_pool" in paths:
            pool = model.get_submodule("roi_heads.box_roi_pool")
            self._hooks.append(pool.register_forward_pre_hook(self._count_rois))

    def close(self) -> None:
        """Remove the hooks (another size, or ``summarize``, must not be counted)."""
        for handle in self._hooks:
            handle.remove()

    def _enter(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._started[path] = time.perf_counter()

        return hook

    def _leave(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._spent[path] = time.perf_counter() - self._started[path]

        return hook

    def _count_rois(self, module: nn.Module, args: tuple) -> None:
        proposals = args[1]
        self.rois.append(sum(len(p) for p in proposals) / len(proposals))

    def __call__(self, batch: torch.Tensor) -> None:
        self._spent = {}
        started = time.perf_counter()
        self.model.detect(batch, PREDICT_LIMITS)
        total = time.perf_counter() - started
        call = {
            stage: sum(self._spent[p] for p in add) - sum(self._spent[p] for p in sub)
            for stage, (add, sub) in self.stages.items()
        }
        call[self.rest] = total - sum(call.values())
        self.calls.append(call)

    def median_ms(self, skip: int) -> dict[str, float]:
        """Median milliseconds per stage over the calls after the first ``skip``."""
        timed = self.calls[skip:]
        return {s: 1000 * statistics.median(c[s] for c in timed) for s in timed[0]}


def stage_gmacs(model: nn.Module, size: int, batch: int) -> dict[str, float]:
    """Multiply-adds per image of each stage (``summarize``'s per-layer MACs summed by
    module path), and ``total``."""
    summary = summarize(model, input_size=(3, size, size), batch_size=batch)

    def macs(path: str) -> int:
        return sum(r.macs for r in summary.layers if (r.name + ".").startswith(path + "."))

    per_stage = {
        stage: (sum(macs(p) for p in add) - sum(macs(p) for p in sub)) / batch / 1e9
        for stage, (add, sub) in stages_of(model).items()
    }
    per_stage["total"] = summary.total_macs / batch / 1e9
    return per_stage


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    if args.yolo_run and args.rcnn_run:
        from cnnlab.runs import load_run

        yolo = load_run(args.yolo_run, "cpu").model
        rcnn = load_run(args.rcnn_run, "cpu").model
        return {"yolov1": yolo.eval(), "fasterrcnn": rcnn.eval()}
    models = {}
    for name, arch, extra in (
        ("yolov1", "yolov1", {}),
        ("fasterrcnn", "fasterrcnn", {}),
        ("fasterrcnn-4096", "fasterrcnn", {"representation_size": 4096}),
    ):
        torch.manual_seed(0)
        models[name] = create_model(
            arch, num_classes=args.classes, backbone=args.backbone, **extra
        ).eval()
    return models


def measure(models: dict[str, nn.Module], size: int, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(size)
    batch = torch.rand(args.batch, 3, size, size)
    clocks = {name: StageClock(model) for name, model in models.items()}
    with torch.inference_mode():
        seconds = interleaved(
            {name: (lambda c=clock: c(batch)) for name, clock in clocks.items()}, args.repeats
        )
    for clock in clocks.values():
        clock.close()
    rows = []
    yolo_macs = stage_gmacs(models["yolov1"], size, args.batch)
    for name in models:
        if name == "yolov1":
            continue
        rcnn_macs = stage_gmacs(models[name], size, args.batch)
        clock = clocks[name]
        width = models[name].roi_heads.box_head.fc7.out_features
        row = rate_row(
            f"predict {args.backbone} {size}x{size} batch {args.batch}, box head {width}",
            args.batch / seconds["yolov1"],
            args.batch / seconds[name],
            f"images/s (ours: yolov1, baseline: {name})",
        )
        rows.append(
            {
                **asdict(row),
                "size": size,
                "box_head": width,
                "ours_gmacs": round(yolo_macs["total"], 3),
                "baseline_gmacs": round(rcnn_macs["total"], 3),
                "rois_per_image": statistics.median(clock.rois),
                "ours_stages_ms": _rounded(clocks["yolov1"].median_ms(skip=1)),
                "baseline_stages_ms": _rounded(clock.median_ms(skip=1)),
                "ours_stages_gmacs": _rounded(yolo_macs),
                "baseline_stages_gmacs": _rounded(rcnn_macs),
            }
        )
        for key in ("ours", "baseline", "ratio"):
            rows[-1][key] = round(rows[-1][key], 3)
    return rows


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def print_table(rows: list[dict], title: str, machine: str) -> None:
    print(f"{title}  ({machine})")
    width = max(len(r["name"]) for r in rows)
    print(
        f"{'':{width}}  {'yolov1 img/s':>12}  {'frcnn img/s':>11}  {'ratio':>6}"
        f"  {'yolov1 GMACs':>12}  {'frcnn GMACs':>11}  {'MACs ratio':>10}"
    )
    for r in rows:
        print(
            f"{r['name']:{width}}  {r['ours']:12.2f}  {r['baseline']:11.2f}  {r['ratio']:6.2f}"
            f"  {r['ours_gmacs']:12.2f}  {r['baseline_gmacs']:11.2f}"
            f"  {r['baseline_gmacs'] / r['ours_gmacs']:10.2f}"
        )
    shown = set()
    for r in rows:
        size = f"{r['size']}x{r['size']}"
        if size not in shown:  # one YOLOv1 timing backs every row of a size
            shown.add(size)
            print_stages(f"yolov1 {size}", r["ours_stages_ms"], r["ours_stages_gmacs"])
        title = f"fasterrcnn {size}, box head {r['box_head']}, {r['rois_per_image']:.0f} RoIs"
        print_stages(title, r["baseline_stages_ms"], r["baseline_stages_gmacs"])


def print_stages(title: str, stages_ms: dict[str, float], gmacs: dict[str, float]) -> None:
    print(f"\n{title}: median ms per call, share of their sum, GMACs per image")
    total = sum(stages_ms.values())
    for stage, ms in stages_ms.items():
        macs = f"{gmacs[stage]:8.3f}" if stage in gmacs else f"{'-':>8}"
        print(f"  {stage:<18} {ms:8.1f}  {100 * ms / total:5.1f}%  {macs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 128])
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--yolo-run", help="time a trained YOLOv1 run instead (with --rcnn-run)")
    parser.add_argument("--rcnn-run", help="time a trained Faster R-CNN run instead")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build(args)
    results = []
    for load in [0, *[n for n in args.load if n > 0]]:
        with busy_loops(load):
            rows = [row for size in args.sizes for row in measure(models, size, args)]
            results.append({"load": load, "machine": machine_line(), "rows": rows})
    if args.format == "json":
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print_table(result["rows"], load_title("detect_speed", result["load"]), result["machine"])


if __name__ == "__main__":
    main()
