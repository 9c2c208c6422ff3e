"""Shared by the speed benchmarks: interleaved timing, the result row, the output table.

Each benchmark times the project and its baseline in the same process, alternating which
goes first in each repetition so that both see the same machine load, and reports medians.
``--load N`` (``add_load_flag``, ``under_loads``) measures again with N busy-loop processes
running beside the benchmark, started for the measurement and always stopped after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    contenders: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each contender, run alternately ``repeats`` times (the
    order reversed every other round) after ``warmup`` untimed rounds. ``clock``:
    ``time.process_time`` counts this process's CPU seconds instead of wall time, which on
    a busy machine leaves out the waits for a core (for one-thread contenders)."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            started = clock()
            contenders[name]()
            times[name].append(clock() - started)
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


def report(rows: list[Row], form: str, title: str, machine: str | None = None) -> None:
    """A table on stdout, or with ``form == "json"`` the rows as one JSON list; ``machine``
    (default: ``machine_line()`` now) says how loaded the machine was."""
    if form == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    print(f"{title}  ({machine or machine_line()})")
    width = max(len(r.name) for r in rows)
    print(f"{'':{width}}  {'ours':>12}  {'baseline':>12}  {'ratio':>6}  unit")
    for r in rows:
        print(f"{r.name:{width}}  {r.ours:12.4g}  {r.baseline:12.4g}  {r.ratio:6.3f}  {r.unit}")


# ---------------------------------------------------------------------------- --load N

BUSY_LOOP = "while True: pass"
SETTLE_SECONDS = 45.0  # at most this long for the 1-minute load average to show the load


def add_load_flag(parser: argparse.ArgumentParser) -> None:
    """``--load N [N ...]``: after the idle measurement, measure again with N busy loops."""
    parser.add_argument(
        "--load",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also measure with N busy-loop processes running (e.g. --load 2 4)",
    )


@contextlib.contextmanager
def busy_loops(n: int, settle: float | None = None) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning on a core each for the block, stopped after it whatever
    happens (an error, Ctrl-C, SIGTERM). Before the block it waits, up to ``settle``
    seconds, until the 1-minute load average has risen by 60% of ``n``: cnnlab's CPU rule
    reads that average, as it would on a machine whose other work has been running a while.
    """
    procs: list[subprocess.Popen] = []
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # runs the finally below

    try:
        if n > 0:
            signal.signal(signal.SIGTERM, stop)
        start_load = os.getloadavg()[0]
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        settle = SETTLE_SECONDS if settle is None else settle
        deadline = time.monotonic() + (settle if n else 0)
        while time.monotonic() < deadline and os.getloadavg()[0] < start_load + 0.6 * n:
            time.sleep(1.0)
        yield procs
    finally:
        stop_processes(procs)
        if n > 0:
            signal.signal(signal.SIGTERM, previous)


def stop_processes(procs: list[subprocess.Popen], timeout: float = 5) -> None:
    """SIGTERM every one of ``procs`` still running (each may pass it on to its own
    children), then SIGKILL any that has not ended ``timeout`` seconds later."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Loaded:
    """One load level's rows, with the machine line taken while the load still ran."""

    load: int
    rows: list[Row]
    machine: str


def under_loads(loads: list[int], measure: Callable[[int], list[Row]]) -> list[Loaded]:
    """``measure(load)`` idle (load 0) and then under each of ``loads`` busy loops."""
    results = []
    for load in [0, *[n for n in loads if n > 0]]:
        with busy_loops(load):
            rows = measure(load)
            results.append(Loaded(load, rows, machine_line()))
    return results


def load_title(title: str, load: int) -> str:
    return f"{title}, idle" if load == 0 else f"{title}, with {load} busy loops (--load {load})"


def report_loads(results: list[Loaded], form: str, title: str) -> None:
    """``report`` once per load; with ``form == "json"`` one list of {load, machine, rows}."""
    if form == "json":
        doc = [
            {"load": r.load, "machine": r.machine, "rows": [asdict(row) for row in r.rows]}
            for r in results
        ]
        print(json.dumps(doc, indent=2))
        return
    for r in results:
        report(r.rows, form, load_title(title, r.load), r.machine)
