"""Training speed: cnnlab's engine against a bare PyTorch loop, in images/s.

Both sides train the same model (one module, each side with its own optimizer) on the same
in-memory batches with the same recipe: AdamW (lr 1e-3, weight decay 0.05), cross-entropy,
gradient clipping at norm 1.0, and the warm-up + cosine schedule stepped after every step.
The engine side runs ``cnnlab.engine.step.train_epoch``, the code ``fit`` runs for every
epoch: the device moves, autocast and GradScaler (disabled on CPU), the step, the schedule,
the running sums of loss and right answers kept on the device, and the progress hook, with
the optimizer ``fit`` builds (AdamW's fused step, also on CPU). The baseline is the loop of the
PyTorch tutorial (zero_grad, forward, loss, backward, clip, step, schedule) with AdamW's
default step. The engine's bookkeeping must cost less than its fused step wins back: the
target is a ratio of at least 0.97.

It also prints the training FLOP/s each side reaches (3 x forward MACs x 2 per image: the
backward pass costs about twice the forward; MACs from ``cnnlab.inspect.summarize``) as a
fraction of this machine's fp32 matmul peak, measured in the same run (a torch.mm loop).

    python benchmarks/train_step.py                  # ConvNet 32x32 b64, ResNet-18 224x224 b16
    python benchmarks/train_step.py --format json
    python benchmarks/train_step.py --load 2       # idle, then with 2 busy loops
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from _bench import Row, add_load_flag, interleaved, matmul_peak, rate_row, report_loads, under_loads
from cnnlab import create_model
from cnnlab.config import TrainConfig
from cnnlab.data.transforms import default_stats
from cnnlab.engine.optim import make_optimizer, warmup_cosine
from cnnlab.engine.progress import Reporter
from cnnlab.engine.step import Step, train_epoch
from cnnlab.inspect import summarize
from cnnlab.tasks.classify import ClassifyTask


@dataclass
class Case:
    name: str
    model: str
    size: int
    batch: int
    batches: int  # batches per timed pass: short passes, many of them, resist load swings
    repeats: int  # timed passes per side
    model_args: dict


CASES = {
    "convnet": Case("ConvNet 32x32 batch 64", "convnet", 32, 64, 4, 21, {"img_size": 32}),
    "resnet18": Case("ResNet-18 224x224 batch 16", "resnet18", 224, 16, 1, 11, {}),
}
CLASSES = 10
TOTAL_STEPS = 10_000  # schedule length: the lr stays in its cosine, never at 0


def _schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 100, TOTAL_STEPS)
    )


def engine_pass(model: nn.Module, batches: list) -> callable:
    cfg = TrainConfig(data="-", out="-", lr=1e-3, weight_decay=0.05, quiet=True)
    optimizer = make_optimizer(model, cfg)  # as fit builds it: fused on CPU
    scheduler = _schedule(optimizer)
    channels, size = batches[0][0].shape[1:3]
    task = ClassifyTask([str(i) for i in range(CLASSES)], channels, size, *default_stats(channels))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = Step(model, task, optimizer, scaler, torch.device("cpu"), None, cfg.grad_clip)
    say = Reporter(quiet=True)

    def run() -> None:
        loss_sum = train_epoch(step, batches, scheduler, say)[1]
        loss_sum.item()  # the engine reads its sums once per epoch

    return run


def bare_pass(model: nn.Module, batches: list) -> callable:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = _schedule(optimizer)

    def run() -> None:
        for images, targets in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), targets)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

    return run


def measure(case: Case, repeats: int | None) -> tuple[dict[str, float], int]:
    """Images/s of each side, and the model's forward MACs per image."""
    torch.manual_seed(0)
    model = create_model(case.model, num_classes=CLASSES, in_channels=3, **case.model_args)
    macs = summarize(model, input_size=(3, case.size, case.size)).total_macs
    batches = [
        (torch.randn(case.batch, 3, case.size, case.size), torch.randint(0, CLASSES, (case.batch,)))
        for _ in range(case.batches)
    ]
    # One model trained by both sides in turn (each with its own optimizer): two copies can
    # land differently in memory and caches, which moved the ratio by several percent.
    model.train()
    seconds = interleaved(
        {"ours": engine_pass(model, batches), "baseline": bare_pass(model, batches)},
        repeats or case.repeats,
    )
    images = case.batch * case.batches
    return {name: images / s for name, s in seconds.items()}, macs


def rows_for(case: Case, rate: dict[str, float], macs: int, peak: float) -> list[Row]:
    flops = {name: 3 * 2 * macs * r for name, r in rate.items()}
    return [
        rate_row(f"{case.name}: training", rate["ours"], rate["baseline"], "images/s"),
        rate_row(
            f"{case.name}: training FLOP/s / fp32 matmul peak",
            flops["ours"] / peak,
            flops["baseline"] / peak,
            f"fraction of {peak / 1e9:.1f} GFLOP/s",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, help="timed passes per side (default per case)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def rows(load: int) -> list[Row]:
        peak = matmul_peak()
        measured = [(CASES[name], *measure(CASES[name], args.repeats)) for name in args.cases]
        peak = max(peak, matmul_peak())  # the best the machine showed, before or after
        return [row for case, rate, macs in measured for row in rows_for(case, rate, macs, peak)]

    title = "train_step: cnnlab engine vs bare PyTorch loop"
    report_loads(under_loads(args.load, rows), args.format, title)


if __name__ == "__main__":
    main()
