"""Prediction speed: ``cnnlab predict``'s model paths against torchvision's eager ResNet-18.

Ours is a run folder loaded with ``cnnlab.runs.load_run``, exactly what ``cnnlab predict``
does: BatchNorm folded into the convolutions, weights in channels_last, the convolutions
fused with their ReLU and residual add and packed per input shape (``Run.predictor``,
``cnnlab.cpu_fusion``), and ``Run.predict`` timed on uint8 224x224 images (the run's
evaluation transform, stack, forward under inference_mode, softmax, top-5). The "folded"
contender is the same run predicting with the folded module unfused (``Run.model``, what
predict ran before the fusion). The baseline is
``torchvision.models.resnet18`` with the same weights, eager, in eval mode under
inference_mode, on the same images through the same transform in the default (NCHW)
layout, followed by the same softmax and top-5. The weights are random but
"trained-looking" (BatchNorm statistics and affine parameters away from the identity), so
the folding is really exercised; the script checks that both give the same top-1 and
logits within 1e-4. Target: torch (fused) >= 1.3x eager at batch 1 and 16.

The ONNX Runtime rows export the same run (``cnnlab.export.export_run``, dynamic batch,
its parity check included) and time ``load_run(RUN, backend="onnxruntime").predict`` on
the same images, against the eager baseline and against the torch path, at batch 1 and
16 with one and two threads (torch's and ONNX Runtime's). All must give the same top-1.
Target: ONNX Runtime >= 1.3x the torch path (issue 29), at batch 1 and 16. For batch 1 the
script also prints where the time goes (preprocessing, the model, the rest), medians of
interleaved calls, on stderr.

``--clock cpu`` times each call by this process's CPU time instead of the wall clock:
with ``--threads 1`` on a busy machine the ratios then leave out the waits for a core
(which made the wall-clock ratios swing by 0.3 under a load average of 7).

``--compile`` adds a row for torch.compile on top of our model (after its compile time,
which it also prints): the reason ``load_run`` does not use it is that time.

    python benchmarks/predict.py
    python benchmarks/predict.py --threads 1 --batches 1 --format json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from _bench import Row, add_load_flag, interleaved, rate_row, report_loads, under_loads
from cnnlab import checkpoint, create_model
from cnnlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, classify_eval
from cnnlab.export import describe, export_run
from cnnlab.runs import load_run

BATCH, SIZE, CLASSES = 16, 224, 1000
UNIT = "images/s"
FLOAT = ("torch", "onnxruntime")  # the float backends; int8 is benchmarks/int8.py's
TARGETS = ("torch (fused) vs eager", "ONNX Runtime vs torch (fused)")  # each >= 1.3 (issue 29)


def trained_looking_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=CLASSES, in_channels=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


def write_run(model: nn.Module, folder: Path) -> Path:
    checkpoint.save_weights(folder / "best.safetensors", model)
    meta = {
        "task": "classify",
        "architecture": "resnet18",
        "model_args": {"num_classes": CLASSES, "in_channels": 3},
        "classes": [f"class{i}" for i in range(CLASSES)],
        "input_size": [3, SIZE, SIZE],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    checkpoint.save_model_json(folder, checkpoint.ModelMeta(**meta))
    return folder


def baseline_infer(model: nn.Module, images: list[torch.Tensor]):
    transform = classify_eval(SIZE, IMAGENET_MEAN, IMAGENET_STD)

    def run() -> None:
        with torch.inference_mode():
            probs = model(torch.stack([transform(image) for image in images])).softmax(dim=1)
            probs.topk(5, dim=1)

    return run


def same_answers(runs: dict, baseline: nn.Module, images: list[torch.Tensor]) -> None:
    """Every path's top-1 on ``images`` equals the baseline's, and its logits are within
    1e-4 of them; exits otherwise."""
    transform = classify_eval(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    batch = torch.stack([transform(image) for image in images])
    with torch.inference_mode():
        expected = baseline(batch)
        for name, run in runs.items():
            got = run.predictor(batch.contiguous(memory_format=torch.channels_last))
            difference = (got - expected).abs().max().item()
            same_top1 = torch.equal(got.argmax(1), expected.argmax(1))
            top1 = [result["top"][0]["class"] for result in run.predict(images, topk=1)]
            same_top1 &= top1 == [f"class{i}" for i in expected.argmax(1).tolist()]
            print(
                f"{name}: max |logit difference| from eager {difference:.2e} (limit 1e-4),"
                f" same top-1: {same_top1}",
                file=sys.stderr,
            )
            if difference > 1e-4 or not same_top1:
                raise SystemExit(f"{name} changed the model's answers")


def breakdown(runs: dict, images: list[torch.Tensor], repeats: int) -> str:
    """Median ms of each stage of one predict call on ``images``: preprocessing (shared),
    each path's model call, and the rest of ``Run.predict`` (softmax, top-5, the dicts)."""
    task = runs["torch"].task
    batch = torch.stack([task.preprocess(image) for image in images])
    layout = batch.contiguous(memory_format=torch.channels_last)

    def stage(function):
        def call() -> None:
            with torch.inference_mode():
                function()

        return call

    contenders = {
        "preprocess": stage(lambda: torch.stack([task.preprocess(i) for i in images])),
        "torch model": stage(lambda: runs["torch"].predictor(layout)),
        "onnxruntime model": stage(lambda: runs["onnxruntime"].model(layout)),
        "torch predict": lambda: runs["torch"].predict(images, topk=5),
        "onnxruntime predict": lambda: runs["onnxruntime"].predict(images, topk=5),
    }
    ms = {name: 1000 * s for name, s in interleaved(contenders, repeats, warmup=2).items()}
    parts = []
    for path in ("torch", "onnxruntime"):
        rest = ms[f"{path} predict"] - ms["preprocess"] - ms[f"{path} model"]
        parts.append(
            f"{path} {ms[f'{path} predict']:.1f} ms = preprocess {ms['preprocess']:.1f}"
            f" + model {ms[f'{path} model']:.1f} + rest {rest:.1f}"
        )
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per contender")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(1 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, BATCH], help="(1 16)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time calls by the wall clock, or by this process's CPU time: on a busy"
        " machine with --threads 1 that leaves out the waits for a core",
    )
    add_load_flag(parser)
    args = parser.parse_args()

    model = trained_looking_resnet18()
    baseline = torchvision.models.resnet18(num_classes=CLASSES).eval()
    baseline.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    images = [
        torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(max(args.batches))
    ]

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def rows_at(load: int) -> list[Row]:
        rows: list[Row] = []
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_run(model, Path(tmp))
            record = export_run(folder, "onnx", dynamic_batch=True, images=4)
            parity = describe(record).splitlines()[1]
            print(f"exported in {record['export_seconds']:.1f} s; {parity}", file=sys.stderr)
            for threads in args.threads:
                torch.set_num_threads(threads)  # the ONNX Runtime session takes torch's count
                runs = {backend: load_run(folder, "cpu", backend=backend) for backend in FLOAT}
                # The same run predicting with the folded module itself, unfused.
                runs["folded"] = dataclasses.replace(runs["torch"])
                same_answers(runs, baseline, images)
                for size in args.batches:
                    rows += measure(runs, baseline, images[:size], threads, args.repeats, clock)
            if args.compile:
                rows.append(compile_row(runs["torch"], baseline, images[:BATCH], args.repeats))
        return rows

    results = under_loads(args.load, rows_at)
    title = "predict: load_run's model paths vs torchvision eager ResNet-18"
    report_loads(results, args.format, title)
    rows = [row for result in results for row in result.rows]
    for row in rows:
        if row.name.endswith(TARGETS) and row.ratio < 1.3:
            print(f"target missed: {row.name} {row.ratio:.2f} < 1.3 (see above)", file=sys.stderr)


def measure(
    runs: dict,
    baseline: nn.Module,
    images: list[torch.Tensor],
    threads: int,
    repeats: int,
    clock: Callable[[], float],
) -> list[Row]:
    """The four paths on one batch, interleaved: torch (fused, what predict runs) against
    eager and against the folded module unfused, ONNX Runtime against eager and torch."""
    contenders = {
        "torch": lambda: runs["torch"].predict(images, topk=5),
        "folded": lambda: runs["folded"].predict(images, topk=5),
        "eager": baseline_infer(baseline, images),
        "onnxruntime": lambda: runs["onnxruntime"].predict(images, topk=5),
    }
    seconds = interleaved(contenders, repeats, 2, clock)
    rate = {name: len(images) / s for name, s in seconds.items()}
    where = f"ResNet-18 224x224 batch {len(images)}, {threads} thread{'s' * (threads > 1)}"
    if clock is time.process_time:
        where += ", CPU time"
    if len(images) == 1:
        print(f"{where}, where the time goes: {breakdown(runs, images, repeats)}", file=sys.stderr)
    return [
        rate_row(f"{where}: torch (fused) vs eager", rate["torch"], rate["eager"], UNIT),
        rate_row(f"{where}: torch (fused) vs folded, unfused", rate["torch"], rate["folded"], UNIT),
        rate_row(f"{where}: ONNX Runtime vs eager", rate["onnxruntime"], rate["eager"], UNIT),
        rate_row(
            f"{where}: ONNX Runtime vs torch (fused)", rate["onnxruntime"], rate["torch"], UNIT
        ),
    ]


def compile_row(run, baseline: nn.Module, images: list[torch.Tensor], repeats: int) -> Row:
    """torch.compile of the folded model against the eager baseline, after compiling."""
    transform = classify_eval(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    batch = torch.stack([transform(image) for image in images])
    compiled = torch.compile(run.model)
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(batch.contiguous(memory_format=torch.channels_last))
    compile_seconds = time.perf_counter() - started
    contenders = {
        "compiled": baseline_infer(compiled, images),
        "eager": baseline_infer(baseline, images),
    }
    seconds = interleaved(contenders, repeats, warmup=2)
    return rate_row(
        f"batch {len(images)} with torch.compile (compiling took {compile_seconds:.0f} s)",
        len(images) / seconds["compiled"],
        len(images) / seconds["eager"],
        UNIT,
    )


if __name__ == "__main__":
    main()
