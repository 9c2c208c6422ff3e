"""The explore page: ``cnnlab explore resnet50 --input 3,224,224`` in a child process, a
browser (Playwright, Debian's chromium launched as the page tests do) on its page.

Measured each round, on a fresh server (nothing built yet):

- first paint of the layer list: from asking for the page to its first layer row drawn
  (the server summarises the model and follows its fields on the first request); against
  ``summarize_spec("resnet50")`` in this process, the inspector alone;
- one layer's feature maps: ``GET /api/explore/maps`` for the sample photo at five layers
  from the stem to the last block, each once (the weights are built in the background
  while the page draws; the first request waits for them if they are not ready), the
  median and the slowest; against a plain forward pass of torchvision's ResNet-50 in this
  process, one thread as the server's;
- the server's peak memory (VmHWM) after the round, against a process that only imports
  torch and builds a random ResNet-50.

Targets: first paint <= 2 s, maps <= 1 s each, idle and under ``--load``.

    python benchmarks/explore.py [--rounds 3] [--load 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import httpx
import torch
import torchvision

from _bench import Row, add_load_flag, report_loads, under_loads
from cnnlab.inspect.specs import summarize_spec
from cnnlab.serve.chromium import chromium_launch

LAYERS = ("conv1", "layer1.0.conv1", "layer2.1.conv2", "layer3.3.relu", "layer4.2.conv3")
ANNOUNCED = re.compile(r"^cnnlab explore: \S+ at (http://\S+/)explore")


def start_server() -> tuple[subprocess.Popen, str]:
    command = ["cnnlab", "explore", "resnet50", "--input", "3,224,224", "--port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    for line in process.stderr:
        if found := ANNOUNCED.match(line):
            return process, found.group(1)
    raise RuntimeError("the server did not start")


def peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def floor_mb() -> float:
    """Peak memory of a process that imports torch and builds a random ResNet-50."""
    code = (
        "import torchvision, resource; torchvision.models.resnet50();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def one_round(browser) -> tuple[float, list[float], float]:
    """(seconds to the first layer row, seconds per layer's maps, server peak MB)."""
    process, url = start_server()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        started = time.perf_counter()
        page.goto(f"{url}explore?model=resnet50")
        page.wait_for_selector(".layer-row")
        paint = time.perf_counter() - started
        with httpx.Client(base_url=url, timeout=60) as client:
            names = [r["name"] for r in page_layers(client)]
            times = []
            for name in LAYERS:
                index = names.index(name)
                started = time.perf_counter()
                answer = client.get(
                    "/api/explore/maps",
                    params={"model": "resnet50", "layer": index, "image": "china"},
                )
                answer.raise_for_status()
                times.append(time.perf_counter() - started)
        page.close()
        return paint, times, peak_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def page_layers(client: httpx.Client) -> list[dict]:
    return client.get("/api/explore/layers", params={"model": "resnet50"}).json()["layers"]


def baseline_forward() -> float:
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
        started = time.perf_counter()
        model(x)
    return time.perf_counter() - started


def baseline_summary() -> float:
    started = time.perf_counter()
    summarize_spec("resnet50", {}, (3, 224, 224))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers per load level")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the server's (OMP_NUM_THREADS=1 unless set)
    from playwright.sync_api import sync_playwright

    def measure(load: int) -> list[Row]:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(**chromium_launch())
            rounds = [one_round(browser) for _ in range(args.rounds)]
            browser.close()
        paint = statistics.median(r[0] for r in rounds)
        maps = [t for r in rounds for t in r[1]]
        peak = max(r[2] for r in rounds)
        summary = statistics.median(baseline_summary() for _ in range(3))
        forward = statistics.median(baseline_forward() for _ in range(3))
        floor = floor_mb()
        return [
            Row("first paint of the layer list", paint, summary, "s", summary / paint),
            Row(
                "one layer's maps, median",
                statistics.median(maps),
                forward,
                "s",
                forward / statistics.median(maps),
            ),
            Row("one layer's maps, slowest", max(maps), forward, "s", forward / max(maps)),
            Row("server peak memory", peak, floor, "MB", floor / peak),
        ]

    title = "cnnlab explore resnet50 at 224 (baseline: summarize, a forward pass, a bare process)"
    report_loads(under_loads(args.load, measure), args.format, title)


if __name__ == "__main__":
    main()
