"""int8 on the CPU: ONNX Runtime's quantize_static against PyTorch's PT2E quantisation, both
against the float ONNX Runtime graph, in the same process.

Speed: ResNet-18 at 224x224 (1000 classes, "trained-looking" random weights, as
benchmarks/predict.py), batch 1, one thread by default. Contenders, timed interleaved:

* ``float onnxruntime``: ``cnnlab export``'s float graph (BatchNorm folded) in ONNX Runtime;
* ``int8 onnxruntime``: that graph through ``cnnlab.export.int8.quantize_onnx`` (what
  ``cnnlab export --int8`` writes: QDQ, per-channel int8 weights, uint8 activations);
* ``int8 pt2e``: torchao's PT2E flow with ``X86InductorQuantizer`` (its default static
  config), compiled by inductor with freezing, as torchao documents for CPU;
* ``float inductor``: the float module through the same torch.compile, so the int8 gain
  of PT2E is told apart from what inductor gains on the float model.

Both quantisers calibrate on the same 32 images. Accuracy (``--run RUN``, a classification
run): top-1 on the run's test split of the float model, of ONNX Runtime's int8 model
(``quantize_checked``, as ``export --int8``) and of PT2E's, each calibrated on 64 images of
the run's training split. Target: int8 >= 1.5x float ONNX Runtime at batch 1, one thread,
losing <= 0.5 points of top-1.

    python benchmarks/int8.py
    python benchmarks/int8.py --run runs/r18 --threads 1 --load 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _bench import Row, add_load_flag, interleaved, rate_row, report_loads, under_loads
from cnnlab.export import export_run
from cnnlab.export.int8 import calibration_inputs, quantize_checked, quantize_onnx
from cnnlab.runs import load_run
from cnnlab.runtime import onnx_model
from predict import SIZE, trained_looking_resnet18, write_run

CALIBRATION = 32


def pt2e_int8(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]):
    """(PT2E int8 module compiled by inductor, seconds to quantise and compile)."""
    import torch._inductor.config as inductor
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    started = time.perf_counter()
    inductor.freezing = True  # weights as constants: inductor packs the int8 weights once
    # Strict (TorchDynamo) tracing: with torch 2.14's default non-strict export, torchao
    # 0.18's X86InductorQuantizer fails on ResNet's conv + add + ReLU ("Input partition has
    # more than one output node"), torchvision's ResNet-18 included.
    graph = torch.export.export(model.eval(), (example,), strict=True).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        compiled = torch.compile(converted)
        compiled(example)
    return compiled, time.perf_counter() - started


def float_inductor(model: nn.Module, example: torch.Tensor):
    import torch._inductor.config as inductor

    started = time.perf_counter()
    inductor.freezing = True
    with torch.no_grad():
        compiled = torch.compile(model.eval())
        compiled(example)
    return compiled, time.perf_counter() - started


class OneAtATime(nn.Module):
    """A module traced for batch 1, called per image (evaluation's batches vary)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(image[None]) for image in x.contiguous()])

    def train(self, mode: bool = True) -> OneAtATime:
        return self  # an exported program refuses train() and eval(): it is in eval already


def speed_rows(threads: int, repeats: int) -> list[Row]:
    torch.set_num_threads(threads)
    model = trained_looking_resnet18()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_run(model, Path(tmp))
        export_run(folder, "onnx", images=2)
        run = load_run(folder, device="cpu", fast=False)
        images = [
            run.task.preprocess(
                torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
            )
            for _ in range(CALIBRATION)
        ]
        started = time.perf_counter()
        quantize_onnx(folder / "model.onnx", folder / "int8.onnx", images)
        ort_seconds = time.perf_counter() - started
        float_ort, int8_ort = onnx_model(folder / "model.onnx"), onnx_model(folder / "int8.onnx")
        example = images[0][None]
        pt2e, pt2e_seconds = pt2e_int8(run.model, example, images)
        inductor, inductor_seconds = float_inductor(load_run(folder, device="cpu").model, example)
        print(
            f"quantise: onnxruntime {ort_seconds:.1f} s; pt2e + inductor compile"
            f" {pt2e_seconds:.1f} s; float inductor compile {inductor_seconds:.1f} s",
            file=sys.stderr,
        )
        with torch.inference_mode():
            contenders = {
                "float onnxruntime": lambda: float_ort(example),
                "int8 onnxruntime": lambda: int8_ort(example),
                "int8 pt2e": lambda: pt2e(example),
                "float inductor": lambda: inductor(example),
            }
            rate = {name: 1 / s for name, s in interleaved(contenders, repeats, 3).items()}
    where = f"ResNet-18 224x224 batch 1, {threads} thread{'s' * (threads > 1)}"
    pairs = (
        ("int8 onnxruntime", "float onnxruntime"),
        ("int8 pt2e", "float onnxruntime"),
        ("int8 pt2e", "float inductor"),
        ("float inductor", "float onnxruntime"),
    )
    rows = [rate_row(f"{where}: {a} vs {b}", rate[a], rate[b], "images/s") for a, b in pairs]
    for row in rows:  # at once: the accuracy part takes minutes more
        print(
            f"{row.name}: {row.ours:.2f} vs {row.baseline:.2f} images/s, {row.ratio:.2f}x",
            file=sys.stderr,
        )
    return rows


def accuracy_rows(run_dir: Path) -> list[Row]:
    """Top-1 (as a %) of each int8 model against the float one on the run's test split."""
    run = load_run(run_dir, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        float_file, int8_file = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export_run(run_dir, "onnx", float_file, images=2)
        ort = quantize_checked(run, float_file, int8_file, max_drop=100)
    unfolded = load_run(run_dir, device="cpu", fast=False)
    calibration, _ = calibration_inputs(unfolded, 64)
    pt2e, _ = pt2e_int8(unfolded.model, calibration[0][None], calibration)
    with torch.inference_mode():
        report = dataclasses.replace(unfolded, model=OneAtATime(pt2e)).evaluate()
    float_top1 = 100 * ort["float"]
    name = f"{run_dir.name} ({run.meta.architecture} at {run.meta.input_size[1]} px) test top-1"
    print(
        f"{name}: float {float_top1:.2f}%, onnxruntime int8 {100 * ort['int8']:.2f}%"
        f" ({ort['drop_points']:+.2f} points lost, {ort['speedup']:.2f}x at the run's size),"
        f" pt2e int8 {100 * report['top1']:.2f}%",
        file=sys.stderr,
    )
    found = {"onnxruntime": 100 * ort["int8"], "pt2e": 100 * report["top1"]}
    return [
        Row(f"{name}: int8 {which} vs float", top1, float_top1, "% top-1", top1 - float_top1)
        for which, top1 in found.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per contender")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", type=Path, help="a classification run: int8 top-1 drops")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()

    def rows_at(load: int) -> list[Row]:
        rows = speed_rows(args.threads, args.repeats)
        return rows + (accuracy_rows(args.run) if args.run and load == 0 else [])

    results = under_loads(args.load, rows_at)
    report_loads(
        results,
        args.format,
        "int8: onnxruntime quantize_static vs PT2E (ratio: for top-1 rows, points)",
    )
    for row in (r for result in results for r in result.rows):
        if row.name.endswith("int8 onnxruntime vs float onnxruntime") and row.ratio < 1.5:
            print(f"target missed: {row.name} {row.ratio:.2f} < 1.5", file=sys.stderr)


if __name__ == "__main__":
    main()
