"""Shared by the speed benchmarks: interleaved timing, the result row, the output table.

Each benchmark times the project and its baseline in the same process, alternating which
goes first in each repetition so that both see the same machine load, and reports medians.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One measured quantity; ``ratio`` > 1 means the project is faster (or better)."""

    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float


def rate_row(name: str, ours: float, baseline: float, unit: str) -> Row:
    """A row for a higher-is-better rate (images/s, FLOP/s)."""
    return Row(name, ours, baseline, unit, ours / baseline)


def interleaved(
    contenders: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender, run alternately ``repeats`` times (the
    order reversed every other round) after ``warmup`` untimed rounds."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            started = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(seconds: float = 2.0, n: int = 2048) -> float:
    """This machine's fp32 matmul FLOP/s now: the best of a loop of n x n torch.mm calls
    (2 n^3 FLOPs each), with torch's current thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def machine_line() -> str:
    """Threads and load, so a reader can judge how quiet the machine was."""
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}"


def report(rows: list[Row], form: str, title: str) -> None:
    """A table on stdout, or with ``form == "json"`` the rows as one JSON list."""
    if form == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    print(f"{title}  ({machine_line()})")
    width = max(len(r.name) for r in rows)
    print(f"{'':{width}}  {'ours':>12}  {'baseline':>12}  {'ratio':>6}  unit")
    for r in rows:
        print(f"{r.name:{width}}  {r.ours:12.4g}  {r.baseline:12.4g}  {r.ratio:6.3f}  {r.unit}")
