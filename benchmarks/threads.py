"""Torch threads: cnnlab's CPU rule against fixed counts (1 and 2 threads), idle and loaded.

For each case the rule's choice (``cnnlab.device.cpu_plan``, read from the cores free at
the time) and each fixed thread count train the same steps, interleaved; a row's ratio is
the rule's rate over the best fixed count's (1.0: the rule chose the best; below 1: it
lost that much). Run it idle and with ``--load 2 4`` busy loops: the rule should be close
to the best idle and far better than a fixed 2 under load, where two OpenMP threads on two
busy cores wait for each other at every barrier.

Cases: the notes' small ConvNet (32x32, batch 64, 4 steps), ResNet-18 (224x224, batch 16,
one step) and a demo-sized epoch (the demo's ConvNet on 1,257 16x16 digits, batch 32).

    python benchmarks/threads.py --load 2 4
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _bench import Row, add_load_flag, interleaved, rate_row, report_loads, under_loads
from cnnlab import create_model
from cnnlab.demo import DIGITS_DEMO
from cnnlab.device import cpu_plan, use_threads

FIXED = (1, 2)


@dataclass
class Case:
    name: str
    make: Callable[[], Callable[[], None]]  # builds the model and data, returns one timed pass
    images: int  # per timed pass
    repeats: int


def training(model_name: str, size: int, batch: int, steps: int, **args) -> Callable[[], None]:
    torch.manual_seed(0)
    channels = args.pop("in_channels", 3)
    model = create_model(model_name, num_classes=10, in_channels=channels, **args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch * steps, channels, size, size)
    y = torch.randint(0, 10, (batch * steps,))

    def run() -> None:
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    return run


DEMO = DIGITS_DEMO["model_args"]
CASES = {
    "convnet": Case(
        "ConvNet 32x32 batch 64, 4 steps",
        lambda: training("convnet", 32, 64, 4, img_size=32),
        256,
        9,
    ),
    "resnet18": Case(
        "ResNet-18 224x224 batch 16, 1 step", lambda: training("resnet18", 224, 16, 1), 16, 3
    ),
    "demo": Case(
        "demo epoch: ConvNet 16x16 on 1,257 digits, batch 32",
        lambda: training("convnet", 16, 32, 40, in_channels=1, img_size=16, **DEMO),
        1280,
        3,
    ),
}


def measure(case: Case, repeats: int | None) -> tuple[list[Row], str]:
    """The rule against each fixed count on ``case``: one row per fixed count and one
    against the best of them."""
    plan = cpu_plan()
    run = case.make()

    def with_threads(n: int) -> Callable[[], None]:
        def timed() -> None:
            use_threads(n)
            run()

        return timed

    contenders = {"rule": with_threads(plan.threads)}
    contenders.update({f"{n} thread{'s' * (n > 1)}": with_threads(n) for n in FIXED})
    seconds = interleaved(contenders, repeats or case.repeats)
    rate = {name: case.images / s for name, s in seconds.items()}
    best = max((name for name in rate if name != "rule"), key=rate.get)
    label = f"{case.name}: rule ({plan.describe()})"
    rows = [rate_row(f"{label} vs {best} (best fixed)", rate["rule"], rate[best], "images/s")]
    rows += [
        rate_row(f"{case.name}: {name} vs 1 thread", rate[name], rate["1 thread"], "images/s")
        for name in rate
        if name != "1 thread"
    ]
    return rows, plan.describe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, help="timed passes per contender")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    threads = torch.get_num_threads()

    def rows(load: int) -> list[Row]:
        found: list[Row] = []
        for name in args.cases:
            found += measure(CASES[name], args.repeats)[0]
        use_threads(threads)
        return found

    report_loads(under_loads(args.load, rows), args.format, "threads: the CPU rule vs fixed")


if __name__ == "__main__":
    main()
