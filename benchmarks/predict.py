"""Prediction speed: ``cnnlab predict``'s model path against torchvision's eager ResNet-18.

Ours is a run folder loaded with ``cnnlab.runs.load_run``, exactly what ``cnnlab predict``
does: BatchNorm folded into the convolutions, weights in channels_last, and
``Run.predict`` timed on 16 uint8 224x224 images (the run's evaluation transform, stack,
channels_last, forward under inference_mode, softmax, top-5). The baseline is
``torchvision.models.resnet18`` with the same weights, eager, in eval mode under
inference_mode, on the same images through the same transform in the default (NCHW)
layout, followed by the same softmax and top-5. The weights are random but
"trained-looking" (BatchNorm statistics and affine parameters away from the identity), so
the folding is really exercised; the script checks that both give the same top-1 and
logits within 1e-4. Target: ratio >= 1.3.

``--compile`` adds a row for torch.compile on top of our model (after its compile time,
which it also prints): the reason ``load_run`` does not use it is that time.

    python benchmarks/predict.py
    python benchmarks/predict.py --format json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from _bench import Row, interleaved, rate_row, report
from cnnlab import checkpoint, create_model
from cnnlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, classify_eval
from cnnlab.runs import load_run

BATCH, SIZE, CLASSES = 16, 224, 1000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per side")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = trained_looking_resnet18()
    baseline = torchvision.models.resnet18(num_classes=CLASSES).eval()
    baseline.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(write_run(model, Path(tmp)))
    torch.manual_seed(1)
    images = [torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(BATCH)]
    transform = classify_eval(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    batch = torch.stack([transform(image) for image in images])

    with torch.inference_mode():
        expected = baseline(batch)
        got = run.model(batch.contiguous(memory_format=torch.channels_last))
    difference = (got - expected).abs().max().item()
    same_top1 = torch.equal(got.argmax(1), expected.argmax(1))

    contenders = {
        "ours": lambda: run.predict(images, topk=5),
        "baseline": baseline_infer(baseline, images),
    }
    compile_seconds = None
    if args.compile:
        compiled = torch.compile(run.model)
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(batch.contiguous(memory_format=torch.channels_last))
        compile_seconds = time.perf_counter() - started
        contenders["compiled"] = baseline_infer(compiled, images)
    seconds = interleaved(contenders, args.repeats, warmup=2)
    rate = {name: BATCH / s for name, s in seconds.items()}
    rows: list[Row] = [
        rate_row("ResNet-18 224x224 batch 16: predict", rate["ours"], rate["baseline"], "images/s")
    ]
    if compile_seconds is not None:
        rows.append(
            rate_row(
                f"... with torch.compile (compiling took {compile_seconds:.0f} s)",
                rate["compiled"],
                rate["baseline"],
                "images/s",
            )
        )
    report(rows, args.format, "predict: load_run's model vs torchvision eager ResNet-18")
    print(
        f"max |logit difference| {difference:.2e} (limit 1e-4), same top-1: {same_top1}",
        file=sys.stderr,
    )
    if difference > 1e-4 or not same_top1:
        raise SystemExit("the fast path changed the model's answers")


if __name__ == "__main__":
    main()
