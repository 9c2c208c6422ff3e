"""`cnnlab demo` against a bare 30-line PyTorch loop on the same digits, in one run.

Both run as their own process (imports included) in a fresh folder, timed by wall clock
and by CPU seconds (``RUSAGE_CHILDREN``): the demo writes the 1,797 digits as PNGs, reads
them through the real folder pipeline (split, guarded reader, augmentation) and trains
the notes' ConvNet for its 40 epochs; the bare loop (``BARE``, in the notes' style) takes
sklearn's digits as tensors, upsamples them to the demo's 16x16 and trains the same
ConvNet shape with AdamW on a 20% stratified test split. The ratio is demo wall time over
the bare loop's (target: at most 3); each prints its test accuracy (target: >= 99%).
With ``--load 4`` it runs again beside 4 busy loops (target: at most 3x its idle time).

    python benchmarks/demo.py --load 4
"""

from __future__ import annotations

import argparse
import re
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    cnnlab = [sys.executable, "-m", "cnnlab", "demo", "--quiet", "--out", "run"]
    bare = [sys.executable, "-c", BARE]
    idle_wall: list[float] = []

    def measure(load: int) -> list[Row]:
        with tempfile.TemporaryDirectory() as tmp:
            demo = timed(cnnlab, Path(tmp))
            base = timed(bare, Path(tmp))
        print(
            f"load {load}: demo {demo[0]:.1f} s wall, {demo[1]:.1f} s CPU, {demo[2]:.2f}%;"
            f" bare loop {base[0]:.1f} s wall, {base[1]:.1f} s CPU, {base[2]:.2f}%",
            file=sys.stderr,
        )
        rows = [
            Row("wall seconds (ratio: demo / bare loop)", demo[0], base[0], "s", demo[0] / base[0]),
            Row("CPU seconds (ratio: demo / bare loop)", demo[1], base[1], "s", demo[1] / base[1]),
            Row(
                "test accuracy (ratio: demo / bare loop)", demo[2], base[2], "%", demo[2] / base[2]
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
