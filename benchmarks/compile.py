"""torch.compile (inductor, CPU) against eager: the training step and prediction, with the
time compiling costs, so that ``--compile auto`` can decide from figures.

Training: the engine's own step (``cnnlab.engine.step.Step``: forward, loss, backward,
clipping, AdamW's fused step) on the same in-memory batches, eager against the model
compiled by ``cnnlab.compiling.compile_model`` (both train one model, each side with its
own optimizer, as benchmarks/train_step.py does). The compile time is what the first
compiled step costs beyond an eager one (forward and backward graphs). The loader's last
batch is often smaller: the time a batch of another size costs the first time is shown as
"recompile", the price the engine avoids by running such a batch eagerly.

Prediction: the model as ``cnnlab.runs.load_run`` prepares it (eval mode, BatchNorm folded,
channels_last), eager against compiled, at batch 1 and 16, each batch size compiled anew.

Compile times are a first compile's (a fresh inductor cache, unless ``--warm-cache``).
Break-even: the number of steps (or images) after which the compiled side has won back its
compile time, ``compile seconds / (eager - compiled seconds per step)``; "never" when the
compiled step is not faster.

    python benchmarks/compile.py                        # ConvNet (the demo's) and ResNet-18
    python benchmarks/compile.py --cases convnet --parts predict --mode max-autotune-no-cudagraphs
    python benchmarks/compile.py --load 2               # idle, then beside 2 busy loops
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from _bench import Row, add_load_flag, interleaved, report_loads, under_loads
from cnnlab import create_model
from cnnlab.compiling import compile_model
from cnnlab.config import TrainConfig
from cnnlab.data.transforms import default_stats
from cnnlab.engine.optim import make_optimizer
from cnnlab.engine.step import Step
from cnnlab.runs import fold_batchnorm
from cnnlab.tasks.classify import ClassifyTask

CLASSES = 10


@dataclass
class Case:
    name: str
    model: str
    channels: int
    size: int
    train_batch: int
    smaller_batch: int  # a last batch of another size
    train_steps: int  # steps per timed pass
    train_repeats: int
    predict_repeats: int
    model_args: dict


CASES = {
    # The demo's ConvNet (cnnlab.demo.DIGITS_DEMO): 16x16 grayscale digits, batches of 32.
    "convnet": Case(
        "ConvNet (demo)",
        "convnet",
        1,
        16,
        32,
        30,
        8,
        21,
        41,
        {"cdims": [32, 64], "hdims": [128], "dropout": 0.1, "img_size": 16},
    ),
    "resnet18": Case("ResNet-18 224", "resnet18", 3, 224, 16, 9, 1, 7, 11, {}),
}


def ms_row(name: str, compiled: float, eager: float) -> Row:
    """Milliseconds, lower is better: ratio = eager / compiled (> 1: compiled is faster)."""
    return Row(name, compiled * 1e3, eager * 1e3, "ms (compiled vs eager)", eager / compiled)


def break_even(compile_seconds: float, eager: float, compiled: float) -> float:
    """Steps after which the compiled side has paid for its compile time (inf: never)."""
    saved = eager - compiled
    return compile_seconds / saved if saved > 0 else float("inf")


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def train_rows(case: Case, mode: str | None, repeats: int | None) -> list[Row]:
    torch.manual_seed(0)
    model = create_model(
        case.model, num_classes=CLASSES, in_channels=case.channels, **case.model_args
    ).train()
    shape = (case.channels, case.size, case.size)
    batches = [
        (torch.randn(case.train_batch, *shape), torch.randint(0, CLASSES, (case.train_batch,)))
        for _ in range(case.train_steps)
    ]
    small = (
        torch.randn(case.smaller_batch, *shape),
        torch.randint(0, CLASSES, (case.smaller_batch,)),
    )
    task = ClassifyTask([str(i) for i in range(CLASSES)], *shape[:2], *default_stats(case.channels))
    cfg = TrainConfig(data="-", out="-", weight_decay=0.05, quiet=True)

    def stepper(net: nn.Module) -> Step:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        optimizer = make_optimizer(model, cfg)
        return Step(net, task, optimizer, scaler, torch.device("cpu"), None, cfg.grad_clip)

    eager_step = stepper(model)
    eager_first = timed(lambda: eager_step(*batches[0]))
    result = compile_model(model, batches[0][0], grad=True, mode=mode)
    if not result.compiled:
        raise SystemExit(f"{case.name}: compiling failed: {result.reason}")
    compiled_step = stepper(result.model)
    first = timed(lambda: compiled_step(*batches[0]))  # the optimizer's first step
    compile_seconds = result.seconds + first - eager_first

    def pass_of(step: Step) -> Callable[[], None]:
        def run() -> None:
            for images, targets in batches:
                loss, _ = step(images, targets)
            loss.item()

        return run

    seconds = interleaved(
        {"compiled": pass_of(compiled_step), "eager": pass_of(eager_step)},
        repeats or case.train_repeats,
    )
    eager, compiled = (seconds[k] / case.train_steps for k in ("eager", "compiled"))
    recompile = timed(lambda: compiled_step(*small)) - timed(lambda: eager_step(*small))
    label = f"{case.name} training step, batch {case.train_batch}"
    return [
        ms_row(label, compiled, eager),
        Row(f"{label}: compile (fwd+bwd)", compile_seconds, 0.0, "s", 0.0),
        Row(
            f"{label}: a batch of {case.smaller_batch} the first time",
            recompile,
            0.0,
            "s beyond eager",
            0.0,
        ),
        Row(f"{label}: break-even", break_even(compile_seconds, eager, compiled), 0.0, "steps", 0),
    ]


def predict_rows(
    case: Case, mode: str | None, repeats: int | None, fold: bool = True, layout: str = "nhwc"
) -> list[Row]:
    torch.manual_seed(0)
    model = create_model(
        case.model, num_classes=CLASSES, in_channels=case.channels, **case.model_args
    ).eval()
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    if fold:
        fold_batchnorm(model)  # as load_run prepares a run's model
    model.to(memory_format=memory_format)
    rows = []
    for batch in (1, 16):
        images = torch.randn(batch, case.channels, case.size, case.size).contiguous(
            memory_format=memory_format
        )
        eager_model = copy.deepcopy(model)
        result = compile_model(model, images, mode=mode)
        if not result.compiled:
            raise SystemExit(f"{case.name}: compiling failed: {result.reason}")
        compiled_model = result.model

        def call(net: nn.Module, images: torch.Tensor = images) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    net(images)

            return run

        seconds = interleaved(
            {"compiled": call(compiled_model), "eager": call(eager_model)},
            repeats or case.predict_repeats,
        )
        eager, compiled = seconds["eager"] / batch, seconds["compiled"] / batch
        label = f"{case.name} predict, batch {batch}, per image"
        rows += [
            ms_row(label, compiled, eager),
            Row(f"{label}: compile", result.seconds, 0.0, "s", 0.0),
            Row(
                f"{label}: break-even",
                break_even(result.seconds, eager, compiled),
                0.0,
                "images",
                0.0,
            ),
        ]
        torch._dynamo.reset()  # the next batch size compiles from scratch, as a new process
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--parts", nargs="+", choices=("train", "predict"), default=["train", "predict"]
    )
    parser.add_argument(
        "--mode", help="torch.compile mode (default: its default; max-autotune-no-cudagraphs)"
    )
    parser.add_argument(
        "--no-fold", action="store_true", help="predict: keep BatchNorm (load_run folds it)"
    )
    parser.add_argument(
        "--layout",
        choices=("nhwc", "nchw"),
        default="nhwc",
        help="predict: channels_last (load_run's, default) or contiguous weights and batches",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per side (default per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep inductor's on-disk cache (default: a fresh one, the first compile's cost)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = None if args.warm_cache else tempfile.mkdtemp(prefix="cnnlab-inductor-")
    if cache is not None:
        # A model compiled before in any process is read back from inductor's cache in a
        # fraction of the time: the figures are what a user waits for the first time.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache

    def rows(load: int) -> list[Row]:
        out = []
        for name in args.cases:
            if "train" in args.parts:
                out += train_rows(CASES[name], args.mode, args.repeats)
                torch._dynamo.reset()
            if "predict" in args.parts:
                out += predict_rows(
                    CASES[name], args.mode, args.repeats, not args.no_fold, args.layout
                )
        return out

    title = f"compile: torch.compile ({args.mode or 'default mode'}) vs eager"
    if "predict" in args.parts:
        title += f", predict {args.layout}{', BatchNorm kept' if args.no_fold else ''}"
    try:
        report_loads(under_loads(args.load, rows), args.format, title)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
