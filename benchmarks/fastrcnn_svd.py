"""Fast R-CNN's truncated SVD (Girshick 2015, section 3.1) on a trained fastrcnn run: the
time of fc6/fc7 and of whole-image detection with and without ``svd_rank``, and the
validation mAP@0.5 each gives.

Every setting is a copy of the run's model (so each keeps its own SVD factors), timed in
the same process, interleaved (the order reversed every other round), on the same
validation images and their cached selective-search proposals: the fc rows time
``FCHead`` alone on the RoIs those proposals pool to, the detect rows ``model.detect`` on
the batch (backbone, RoIPool, fc6/fc7, classifier, box decoding and NMS). A ratio above 1
means the SVD setting is faster (or, for mAP, better). The printed share of the fc layers
in detection says how much of a speed-up the SVD can give at most: the paper's 2000 RoIs an
image through VGG-16's 25088 -> 4096 fc6 spend about half the time there, while a box head
256 wide on a few hundred RoIs of a 128x128 image spends much less. A last pair of rows
times a fresh head of the model's default width (1024) on the same RoIs, ranks scaled with
the width, to show how the ratio grows with the head.

    python benchmarks/detect_shapes.py --models fastrcnn --work /tmp/shapes
    python benchmarks/fastrcnn_svd.py /tmp/shapes/fastrcnn [--ranks 64 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from _bench import Row, interleaved, machine_line, rate_row, report
from cnnlab.data.images import read_image
from cnnlab.models.detection import EVAL_LIMITS
from cnnlab.models.detection.roi_heads import FCHead
from cnnlab.runs import load_run
from cnnlab.tasks.detect import proposal_source_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a trained fastrcnn (or sppnet) run folder")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--images", type=int, default=8, help="validation images timed")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = load_run(args.run, device="cpu")
    model = run.model
    head = model.roi_heads.box_head
    if not isinstance(head, FCHead):
        raise SystemExit(f"{args.run}: not a Fast R-CNN / SPPNet run (no FCHead)")
    samples = run.task.eval_data(args.run / "split.json", None, "val")[: args.images]
    found = proposal_source_of(model).boxes([s.path for s in samples], progress=False)
    images = [read_image(s.path, run.task.in_channels) for s in samples]
    batch = torch.stack([run.task.preprocess(image) for image in images])
    side = batch.shape[-1]
    proposals = []
    for sample, image in zip(samples, images, strict=True):
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        proposals.append(torch.as_tensor(found[sample.path]).reshape(-1, 4) * (side / scale))
    with torch.inference_mode():
        features = model.backbone(batch)
        sizes = [tuple(batch.shape[-2:])] * len(batch)
        pooled = model.roi_heads.box_roi_pool(features, proposals, sizes)
    rois = len(pooled)
    width = head.fc7.out_features
    settings = {"full": None, **{f"rank {k}": k for k in args.ranks}}
    models = {}
    for name, rank in settings.items():
        models[name] = copy.deepcopy(model)
        models[name].roi_heads.box_head.svd_rank = rank

    def fc(net):
        return lambda: net.roi_heads.box_head(pooled)

    def detect(net):
        return lambda: net.detect(batch, EVAL_LIMITS, proposals=proposals)

    # outside inference_mode, whose tensors FCHead's factor cache cannot key by version
    wide = FCHead(pooled[0].numel(), 1024).eval()
    wide_ranks = {"full": None, **{f"rank {k * 1024 // width}": k * 1024 // width
                                   for k in args.ranks}}  # fmt: skip
    wides = {}
    for name, rank in wide_ranks.items():
        wides[name] = copy.deepcopy(wide)
        wides[name].svd_rank = rank
    with torch.inference_mode():
        fc_times = interleaved({n: fc(m) for n, m in models.items()}, args.repeats)
        detect_times = interleaved({n: detect(m) for n, m in models.items()}, args.repeats)
        wide_times = interleaved({n: (lambda h=h: h(pooled)) for n, h in wides.items()}, 5)
    maps = {}
    for name, rank in settings.items():
        head.svd_rank = rank
        maps[name] = run.evaluate()["map50"]
    head.svd_rank = None

    shape = f"fc6 {pooled[0].numel()}->{width}, fc7 {width}->{width}"
    rows: list[Row] = []
    for name in settings:
        if name == "full":
            continue
        rows.append(rate_row(f"fc6+fc7 {name} ({shape})", rois / fc_times[name],
                             rois / fc_times["full"], "RoIs/s"))  # fmt: skip
        rows.append(rate_row(f"detect {name} ({len(batch)} images, {rois} RoIs)",
                             len(batch) / detect_times[name], len(batch) / detect_times["full"],
                             "images/s"))  # fmt: skip
        rows.append(rate_row(f"val mAP@0.5 {name}", maps[name], maps["full"], "mAP"))
    for name in wide_ranks:
        if name != "full":
            rows.append(rate_row(f"fc6+fc7 width 1024, untrained, {name}",
                                 rois / wide_times[name], rois / wide_times["full"],
                                 "RoIs/s"))  # fmt: skip
    title = f"Fast R-CNN truncated SVD ({args.run}; baseline: the full fc6/fc7)"
    report(rows, args.format, title, machine_line())
    if args.format == "table":
        share = fc_times["full"] / detect_times["full"]
        print(
            f"fc6+fc7 take {share:.0%} of whole-image detection here without SVD"
            f" ({fc_times['full'] * 1e3:.1f} of {detect_times['full'] * 1e3:.1f} ms for"
            f" {len(batch)} images, {rois / len(batch):.0f} RoIs an image); val mAP@0.5 full"
            f" {maps['full']:.3f}, "
            + ", ".join(f"{n} {maps[n]:.3f}" for n in settings if n != "full")
        )


if __name__ == "__main__":
    main()
