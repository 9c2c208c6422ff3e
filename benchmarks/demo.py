"""`cnnlab demo` against a bare 30-line PyTorch loop on the same digits, as whole processes.

Each side is its own process, timed from start to exit by wall clock and by CPU seconds
(``RUSAGE_CHILDREN``): interpreter start, imports, data, training, evaluation, pictures.
The demo is what ``make demo`` runs (``cnnlab demo``, progress and all, here as
``python -m cnnlab demo``: the console script calls the same ``cnnlab.cli.main``) in a
fresh folder, so it writes the 1,797 digits as PNGs, reads them through the real folder
pipeline (split, guarded reader, augmentation), trains the notes' ConvNet for its 20
epochs, evaluates it and draws its pictures. The bare loop (``BARE``, in the notes' style)
takes sklearn's digits as tensors, upsamples them to the demo's 16x16 and trains the same
ConvNet shape with AdamW on a 20% stratified test split, 20 epochs.

``--rounds N`` (default 3) times both N times, alternating which goes first, each round
in new folders; the ratio (demo wall time over the bare loop's, target: at most 2) is the
median of the rounds' ratios, with their spread, and the load average at each start. Each
prints its test accuracy (target: >= 99%). With ``--load 4`` it runs again beside 4 busy
loops (the demo's loaded time over its idle time). On a machine that others keep busy,
torch's default two threads make the bare loop wait for cores at every step (5x its idle
time at a load average of 12 on 2 cores) and the ratio says nothing: ``--threads 1`` runs
both on one thread, and the CPU seconds are then the steadier figure.

    python benchmarks/demo.py --rounds 3 [--load 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import Row, add_load_flag, report_loads, under_loads

BARE = """
import torch, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
x = F.interpolate(x, size=16, mode="bilinear")
x = (x - x.mean()) / x.std()
y = torch.tensor(y)
tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=y, random_state=0)
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10),
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
xtr, ytr = x[tr], y[tr]
for epoch in range(20):
    model.train()
    for idx in torch.randperm(len(tr)).split(32):
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
print(f"test accuracy: {acc:.2%}")
"""


def timed(command: list[str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and the test accuracy (%) a command prints."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = re.search(r"test accuracy: ([\d.]+)%", done.stdout)
    return wall, cpu, float(found.group(1)) if found else float("nan")


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timings of each side (3)")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for both processes (default: each its own choice: the CPU"
        " rule's for the demo, torch's for the bare loop); 1 compares them on a busy machine",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    commands = {
        "demo": [sys.executable, "-m", "cnnlab", "demo"],
        "bare": [sys.executable, "-c", BARE],
    }
    idle_wall: list[float] = []

    def measure(load: int) -> list[Row]:
        runs: dict[str, list[tuple[float, float, float]]] = {"demo": [], "bare": []}
        for round_ in range(args.rounds):
            order = ["demo", "bare"] if round_ % 2 == 0 else ["bare", "demo"]
            loads = []
            for name in order:
                loads.append(os.getloadavg()[0])
                with tempfile.TemporaryDirectory() as tmp:
                    runs[name].append(timed(commands[name], Path(tmp)))
            demo, bare = runs["demo"][-1], runs["bare"][-1]
            print(
                f"load {load}, round {round_ + 1} (load average {loads[0]:.1f}, {loads[1]:.1f}"
                f" at the starts): demo {demo[0]:.1f} s wall, {demo[1]:.1f} s CPU,"
                f" {demo[2]:.2f}%; bare loop {bare[0]:.1f} s wall, {bare[1]:.1f} s CPU,"
                f" {bare[2]:.2f}%; ratio {demo[0] / bare[0]:.2f}",
                file=sys.stderr,
            )
        ratios = [d[0] / b[0] for d, b in zip(runs["demo"], runs["bare"], strict=True)]
        cpu_ratios = [d[1] / b[1] for d, b in zip(runs["demo"], runs["bare"], strict=True)]
        median = {
            name: [statistics.median(run[i] for run in runs[name]) for i in range(3)]
            for name in runs
        }
        demo, bare = median["demo"], median["bare"]
        rows = [
            Row(
                f"wall seconds, median of {args.rounds} (demo / bare; rounds {spread(ratios)})",
                demo[0],
                bare[0],
                "s",
                statistics.median(ratios),
            ),
            Row(
                f"CPU seconds (demo / bare; rounds {spread(cpu_ratios)})",
                demo[1],
                bare[1],
                "s",
                statistics.median(cpu_ratios),
            ),
            Row(
                "lowest test accuracy (demo / bare loop)",
                min(run[2] for run in runs["demo"]),
                min(run[2] for run in runs["bare"]),
                "%",
                min(run[2] for run in runs["demo"]) / min(run[2] for run in runs["bare"]),
            ),
        ]
        if load == 0:
            idle_wall.append(demo[0])
        elif idle_wall:
            rows.append(
                Row("demo wall: loaded / idle", demo[0], idle_wall[0], "s", demo[0] / idle_wall[0])
            )
        return rows

    report_loads(under_loads(args.load, measure), args.format, "demo: cnnlab demo vs bare loop")


if __name__ == "__main__":
    main()
