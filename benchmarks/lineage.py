"""The detection lineage of the notes, measured: R-CNN, SPPNet, Fast R-CNN, Faster R-CNN and
YOLOv1 on one backbone (resnet18, from scratch), one data set and one budget.

Training is detect_shapes.py's: its recipe for each model on 700 training and 100 unseen
validation shapes, one intra-op thread, at 128x128 (detect_shapes' own runs) and at each
other ``--train-sizes`` (the same 800 seed-1 scenes drawn at that size, the recipes scaled
by ``recipe_at``); runs already in --work, with their rows, are kept with --reuse.
Selective search is computed once for the three proposal-based models before they train
and is not in their minutes.

Test-time speed is timed here, in one process on one thread, every model on the same
images, interleaved (the order reversed every other round), one image at a time as a
photo arrives: ``model.detect`` at predict's score threshold (NMS and box decoding
included) and, for R-CNN, SPPNet and Fast R-CNN, selective search on the image (fast mode,
uncached), the same boxes for all three. Per model: proposals an image (selective search's,
the RPN's after its NMS, YOLOv1's S x S x B predicted boxes), CNN forward passes an image
(R-CNN: one per proposal), the multiply-adds of the network (torch's FLOP counter), the
proposal and network seconds an image, and images/s of the two together. At a size in
``--sizes`` that was not trained the models are built fresh with the same settings and
only timed (their speed hardly depends on the weights).

The notes' speed ordering is checked with measured ratios: SPPNet >= 10x R-CNN's network
images/s (the SPPNet paper's 24-102x is of the convolutions, proposals not counted),
Fast R-CNN >= SPPNet, Faster R-CNN faster than Fast R-CNN once proposal time is counted,
YOLOv1 the fastest. ``--plot`` draws images/s against mAP, a point per model and a panel
per trained size (docs/lineage.png).

    python benchmarks/lineage.py --work /tmp/shapes --reuse   # trains what is missing
    python benchmarks/lineage.py --work /tmp/shapes --reuse --train-sizes 128 192 \
        --sizes 256 --plot docs/lineage.png
    python benchmarks/lineage.py --work /tmp/shapes --reuse --format json --load 2
    python benchmarks/lineage.py --no-train --sizes 128 256 --images 8   # speed only
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _bench import add_load_flag, busy_loops, interleaved, load_title, machine_line
from cnnlab import create_model, load_run
from cnnlab.data.detect import make_detection_splits
from cnnlab.data.images import read_image
from cnnlab.data.proposals import selective_search
from cnnlab.data.shapes import write_shapes
from cnnlab.data.transforms import default_stats, detect_eval
from cnnlab.models.detection import PREDICT_LIMITS
from cnnlab.tasks.detect import proposal_source_of
from detect_shapes import IMAGES, ROWS_FILE, SIZE, VAL_SPLIT, recipe_at, run, save_rows

MODELS = ("rcnn", "sppnet", "fastrcnn", "fasterrcnn", "yolov1")
NAMES = {
    "rcnn": "R-CNN",
    "rcnn+224": "R-CNN 224 crops",
    "fastrcnn+svd": "Fast R-CNN SVD",
    "sppnet": "SPPNet",
    "fastrcnn": "Fast R-CNN",
    "fasterrcnn": "Faster R-CNN",
    "yolov1": "YOLOv1",
}
CLASSES = 3  # circle, square, triangle
PAPER_SPP_OVER_RCNN = 10.0  # the target; the SPPNet paper measured 24-102x
SVD_RANK = 64  # Fast R-CNN's truncated SVD at test time (benchmarks/fastrcnn_svd.py)
PAPER_CROPS = {"crop_size": 224, "context_padding": 16}  # R-CNN's 227 and 16, on resnet18
PAPER_IMAGES = 3  # images R-CNN with the paper's crops is timed on (a few seconds each)


def layout(work: Path, size: int) -> tuple[Path, Path]:
    """(shapes data, folder of the runs) at ``size``: detect_shapes' own at 128."""
    if size == SIZE:
        return work / "shapes", work
    return work / f"shapes-{size}", work / f"size-{size}"


def trained_rows(work: Path, size: int, seed: int, threads: int, reuse: bool) -> dict[str, dict]:
    """detect_shapes' row of each model at ``size`` (mAP, training minutes), training what
    is missing (or everything without ``reuse``)."""
    data, runs = layout(work, size)
    if not (data / "annotations.json").is_file():
        write_shapes(data, task="detect", n=IMAGES, size=size, seed=seed)
    runs.mkdir(parents=True, exist_ok=True)
    rows_file = runs / ROWS_FILE
    rows = {r["model"]: r for r in json.loads(rows_file.read_text())} if rows_file.is_file() else {}
    for model in MODELS:
        if reuse and model in rows and (runs / model / "report.json").is_file():
            continue
        shutil.rmtree(runs / model, ignore_errors=True)
        rows[model] = run(model, data, runs, seed, threads, size)
        save_rows(rows_file, [rows[model]])
    return rows


def speed_images(work: Path, size: int, count: int, seed: int, trained: bool) -> list[Path]:
    """``count`` validation images of the shapes trained at ``size``, or new shapes."""
    if trained:
        splits = make_detection_splits(layout(work, size)[0], VAL_SPLIT, seed)
        return [sample.path for sample in splits.val[:count]]
    data = work / f"speed-{size}"
    if not (data / "annotations.json").is_file():
        write_shapes(data, task="detect", n=count, size=size, seed=seed + 100)
    return sorted((data / "images").iterdir())[:count]


def models_at(work: Path, size: int, trained: bool) -> dict[str, nn.Module]:
    """The runs trained at ``size``; untrained, fresh models with the recipes' settings
    (the speed of a model hardly depends on its weights)."""
    if trained:
        runs = layout(work, size)[1]
        return {m: load_run(runs / m, "cpu").model.eval() for m in MODELS}
    built = {}
    for model in MODELS:
        torch.manual_seed(0)
        args = recipe_at(model, size)["model_args"]
        built[model] = create_model(model, num_classes=CLASSES, **args).eval()
    return built


def proposals_of(model: nn.Module, images: list[torch.Tensor]) -> tuple[list, float]:
    """(selective-search boxes of each image, seconds an image) with the model's settings."""
    source = proposal_source_of(model)
    started = time.perf_counter()
    boxes = [
        torch.from_numpy(selective_search(image, source.mode, source.max_boxes)) for image in images
    ]
    return boxes, (time.perf_counter() - started) / len(images)


def boxes_scored(name: str, model: nn.Module, inputs: list, proposals: list | None) -> float:
    """Proposals an image: selective search's, the RPN's after NMS, or YOLOv1's S*S*B."""
    if proposals is not None:
        return statistics.mean(len(p) for p in proposals)
    if name == "yolov1":
        return model.grid * model.grid * model.boxes
    counts = []
    hook = model.rpn.register_forward_hook(
        lambda module, args, output: counts.extend(len(b) for b in output[0])
    )
    with torch.inference_mode():
        for x in inputs:
            model.detect(x, PREDICT_LIMITS)
    hook.remove()
    return statistics.mean(counts)


def detector(model: nn.Module, inputs: list, proposals: list | None):
    """One pass over the images, one ``detect`` call an image, as predict runs them."""

    def once() -> None:
        with torch.inference_mode():
            for k, x in enumerate(inputs):
                given = {} if proposals is None else {"proposals": [proposals[k]]}
                model.detect(x, PREDICT_LIMITS, **given)

    return once


def gmacs(model: nn.Module, inputs: list, proposals: list | None) -> float:
    """Multiply-adds (G) an image of the network, from torch's FLOP counter (2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter:
        detector(model, inputs, proposals)()
    return counter.get_total_flops() / 2 / 1e9 / len(inputs)


def with_svd(model: nn.Module) -> nn.Module:
    """A copy of a Fast R-CNN running fc6/fc7 as their rank-``SVD_RANK`` truncated SVD."""
    compressed = copy.deepcopy(model)
    compressed.roi_heads.box_head.svd_rank = SVD_RANK
    return compressed


def paper_rcnn(size: int) -> nn.Module:
    """An untrained R-CNN with the paper's crops (224 px, 16 px of context), for its speed."""
    torch.manual_seed(0)
    args = {**recipe_at("rcnn", size)["model_args"], **PAPER_CROPS}
    return create_model("rcnn", num_classes=CLASSES, **args).eval()


def speed_row(
    name: str, size: int, model: nn.Module, inputs: list, given: list | None, seconds: float,
    proposal_seconds: float,
) -> dict:  # fmt: skip
    network = seconds / len(inputs)
    proposing = proposal_seconds if given is not None else 0.0
    scored = boxes_scored(name.split("+")[0], model, inputs, given)
    return {
        "model": name,
        "size": size,
        "proposals_per_image": round(scored, 1),
        "forwards_per_image": round(scored, 1) if name.startswith("rcnn") else 1,
        "network_gmacs": round(gmacs(model, inputs, given), 3),
        "proposal_s": round(proposing, 4),
        "network_s": round(network, 4),
        "images_per_s": round(1 / (proposing + network), 2),
        "network_images_per_s": round(1 / network, 2),
    }


def measure(
    work: Path, size: int, count: int, seed: int, repeats: int, trained: bool
) -> list[dict]:
    """The speed rows at ``size``: the five, Fast R-CNN with its truncated SVD, and R-CNN
    with the paper's crops (timed on ``PAPER_IMAGES`` images, one pass, since a forward
    pass per 224 px crop is slow, and scaled to the set's proposals an image)."""
    paths = speed_images(work, size, count, seed, trained)
    images = [read_image(path, 3) for path in paths]
    if any(tuple(image.shape[-2:]) != (size, size) for image in images):
        raise SystemExit(f"the {size} px speed images are not {size}x{size}")
    prepare = detect_eval(size, *default_stats(3))
    inputs = [prepare(image)[None] for image in images]
    models = models_at(work, size, trained)
    models["fastrcnn+svd"] = with_svd(models["fastrcnn"])
    proposals, proposal_seconds = proposals_of(models["fastrcnn"], images)
    given = {m: proposals if proposal_source_of(model) else None for m, model in models.items()}
    timed = {m: detector(model, inputs, given[m]) for m, model in models.items()}
    seconds = interleaved(timed, repeats, warmup=1)
    rows = [
        speed_row(m, size, model, inputs, given[m], seconds[m], proposal_seconds)
        for m, model in models.items()
    ]
    paper = paper_rcnn(size)
    few, few_given = inputs[:PAPER_IMAGES], proposals[:PAPER_IMAGES]
    started = time.perf_counter()
    detector(paper, few, few_given)()
    seconds = time.perf_counter() - started
    row = speed_row("rcnn+224", size, paper, few, few_given, seconds, proposal_seconds)
    rows.append(scaled_to(row, statistics.mean(len(p) for p in proposals), proposal_seconds))
    return rows


def scaled_to(row: dict, crops: float, proposal_seconds: float) -> dict:
    """An R-CNN row timed on a few images, scaled to ``crops`` an image (its cost is a
    forward pass per crop), so that it compares with rows timed on the whole set."""
    factor = crops / row["forwards_per_image"]
    network = row["network_s"] * factor
    return {
        **row,
        "proposals_per_image": round(crops, 1),
        "forwards_per_image": round(crops, 1),
        "network_gmacs": round(row["network_gmacs"] * factor, 3),
        "network_s": round(network, 4),
        "images_per_s": round(1 / (proposal_seconds + network), 2),
        "network_images_per_s": round(1 / network, 2),
    }


def svd_rows(work: Path, size: int, rows: dict[str, dict]) -> dict[str, dict]:
    """The trained Fast R-CNN's row again, with its validation mAP under truncated SVD."""
    run = load_run(layout(work, size)[1] / "fastrcnn", "cpu")
    run.model.roi_heads.box_head.svd_rank = SVD_RANK
    report = run.evaluate()
    fast = rows["fastrcnn"]
    return {
        "fastrcnn+svd": {**fast, "map50": round(report["map50"], 4), "map": round(report["map"], 4)}
    }


def checks(rows: list[dict]) -> list[tuple[str, float, bool, str]]:
    """(claim, measured ratio, holds, the numbers behind it) for the notes' speed order."""
    by = {r["model"]: r for r in rows}

    def network(a: str, b: str) -> float:
        return by[a]["network_images_per_s"] / by[b]["network_images_per_s"]

    def cost(m: str) -> str:
        r = by[m]
        return f"{NAMES[m]} {r['network_gmacs']:.2f} GMACs, {r['network_s'] * 1000:.0f} ms"

    spp, paper = network("sppnet", "rcnn"), network("sppnet", "rcnn+224")
    fast, svd = network("fastrcnn", "sppnet"), network("fastrcnn+svd", "sppnet")
    faster = by["fasterrcnn"]["images_per_s"] / by["fastrcnn"]["images_per_s"]
    others = [r for r in rows if r["model"] != "yolov1"]
    fastest = max(others, key=lambda r: r["images_per_s"])
    yolo = by["yolov1"]["images_per_s"] / fastest["images_per_s"]
    per_crop = by["rcnn"]["network_gmacs"] / by["rcnn"]["forwards_per_image"]
    paper_crop = by["rcnn+224"]["network_gmacs"] / by["rcnn+224"]["forwards_per_image"]
    target = f"{PAPER_SPP_OVER_RCNN:g}x"
    return [
        (
            f"SPPNet >= {target} R-CNN, network, the trained 48 px crops",
            spp,
            spp >= PAPER_SPP_OVER_RCNN,
            f"{by['rcnn']['forwards_per_image']:.0f} crops an image at {per_crop:.3f} GMACs;"
            f" {cost('rcnn')} against {cost('sppnet')}; with selective search counted"
            f" {by['sppnet']['images_per_s'] / by['rcnn']['images_per_s']:.1f}x",
        ),
        (
            f"SPPNet >= {target} R-CNN, network, the paper's 224 px crops",
            paper,
            paper >= PAPER_SPP_OVER_RCNN,
            f"{paper_crop:.2f} GMACs a crop; {cost('rcnn+224')} (timed on {PAPER_IMAGES} images,"
            " scaled to the set's proposals)",
        ),
        (
            "Fast R-CNN >= SPPNet, network",
            fast,
            fast >= 1.0,
            f"{cost('fastrcnn')} against {cost('sppnet')}: the same arithmetic, RoIPool 7x7"
            " and the pyramid's 6x6+3x3+2x2+1x1 feeding fc6 49 and 50 bins; Fast R-CNN's"
            " test-time saving is its truncated SVD, next",
        ),
        (
            f"Fast R-CNN with its truncated SVD (rank {SVD_RANK}) >= SPPNet, network",
            svd,
            svd >= 1.0,
            f"{cost('fastrcnn+svd')} against {cost('sppnet')}",
        ),
        (
            "Faster R-CNN > Fast R-CNN, with proposals",
            faster,
            faster > 1.0,
            f"selective search {by['fastrcnn']['proposal_s'] * 1000:.0f} ms an image;"
            f" {cost('fasterrcnn')} against {cost('fastrcnn')}",
        ),
        (
            "YOLOv1 the fastest, over the next",
            yolo,
            yolo > 1.0,
            f"{cost('yolov1')}; the next is {cost(fastest['model'])}",
        ),
    ]


def print_table(rows: list[dict], trained: dict[str, dict] | None, title: str) -> None:
    print(title)
    print(
        f"{'model':<16} {'props/img':>9} {'CNN fwd/img':>11} {'GMACs':>7} {'prop s/img':>10}"
        f" {'net s/img':>9} {'img/s':>7} {'train min':>9} {'mAP@0.5':>7} {'mAP':>6}"
    )
    for r in rows:
        row = (trained or {}).get(r["model"])
        learned = (
            f"{row['minutes']:>9.1f} {row['map50']:>7.3f} {row['map']:>6.3f}"
            if row
            else f"{'-':>9} {'-':>7} {'-':>6}"
        )
        print(
            f"{NAMES[r['model']]:<16} {r['proposals_per_image']:>9.0f}"
            f" {r['forwards_per_image']:>11.0f} {r['network_gmacs']:>7.2f}"
            f" {r['proposal_s']:>10.3f} {r['network_s']:>9.4f} {r['images_per_s']:>7.2f} {learned}"
        )
    for claim, ratio, holds, why in checks(rows):
        print(f"  {claim}: {ratio:.2f}x  {'holds' if holds else 'MISSED'}  ({why})")


def plot(results: list[dict], trained: dict[int, dict[str, dict]], out: Path) -> None:
    """Images/s against mAP, one labelled point per model (mAP@0.5 filled, mAP@[.5:.95]
    hollow), a panel per trained size, idle."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = sorted(trained)
    fig = Figure(figsize=(7.5 * len(sizes), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, size in zip(axes, sizes, strict=True):
        rows = next(r["rows"] for r in results if r["load"] == 0 and r["size"] == size)
        for r in rows:
            row = trained[size].get(r["model"])
            if row is None or r["model"] not in MODELS:  # the variants are the table's
                continue
            x = r["images_per_s"]
            ax.scatter([x], [row["map50"]], s=60, color="tab:blue", zorder=3)
            ax.scatter(
                [x], [row["map"]], s=60, facecolors="none", edgecolors="tab:orange", zorder=3
            )
            ax.plot([x, x], [row["map"], row["map50"]], color="0.8", zorder=1)
            label = f"{NAMES[r['model']]}\n{x:.1f} img/s"
            if r["model"] == "rcnn":
                label += f"\n{r['forwards_per_image']:.0f} CNN passes"
            # SPPNet and Fast R-CNN sit on one x: one label above-left, one below-right;
            # R-CNN's, below-right, stays clear of SPPNet's.
            dx, dy, ha = {
                "sppnet": (-8, 8, "right"),
                "fastrcnn": (8, -30, "left"),
                "rcnn": (8, -44, "left"),
            }.get(r["model"], (8, 8, "left"))
            ax.annotate(
                label, (x, row["map50"]), textcoords="offset points", xytext=(dx, dy), ha=ha
            )
        ax.scatter([], [], s=60, color="tab:blue", label="mAP@0.5")
        ax.scatter([], [], s=60, facecolors="none", edgecolors="tab:orange", label="mAP@[.5:.95]")
        ax.set_xscale("log")
        ax.set_xlabel("images/s, selective search included (one CPU thread, one image a call)")
        ax.set_ylabel("validation mAP")
        ax.set_ylim(0.4, 1.08)
        ax.margins(x=0.3)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
        ax.set_title(f"{size}x{size} shapes, resnet18 from scratch")
    fig.savefig(out, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: temp)")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --work")
    parser.add_argument("--seed", type=int, default=1, help="seed of the shapes data")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="sizes timed")
    parser.add_argument(
        "--train-sizes", type=int, nargs="+", default=[128], help="sizes trained (and timed)"
    )
    parser.add_argument("--images", type=int, default=24, help="images timed at each size")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over them")
    parser.add_argument(
        "--no-train", action="store_true", help="time fresh models only (no mAP, no training)"
    )
    parser.add_argument("--plot", type=Path, help="write images/s against mAP here (PNG)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    add_load_flag(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train_sizes = [] if args.no_train else args.train_sizes
    sizes = sorted(set(args.sizes) | set(train_sizes))
    work = args.work or Path(tempfile.mkdtemp(prefix="cnnlab-lineage-"))
    trained = {}
    for size in train_sizes:
        rows = trained_rows(work, size, args.seed, args.threads, args.reuse)
        trained[size] = {**rows, **svd_rows(work, size, rows)}
    results = []
    for load in [0, *[n for n in args.load if n > 0]]:
        with busy_loops(load):
            for size in sizes:
                rows = measure(work, size, args.images, args.seed, args.repeats, size in trained)
                results.append(
                    {"load": load, "size": size, "machine": machine_line(), "rows": rows}
                )
    if args.plot and trained:
        plot(results, trained, args.plot)
    if args.format == "json":
        print(json.dumps({"trained": trained, "speed": results}, indent=2))
        return
    for result in results:
        size = result["size"]
        title = load_title(f"lineage at {size}x{size}", result["load"])
        print_table(result["rows"], trained.get(size), f"{title}  ({result['machine']})")
        print()


if __name__ == "__main__":
    main()
