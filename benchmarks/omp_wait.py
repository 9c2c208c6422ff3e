"""OpenMP's wait policy: torch's default against OMP_WAIT_POLICY=PASSIVE and ACTIVE.

A thread of an OpenMP team that reaches a barrier first either spins (ACTIVE; GNU
OpenMP's default spins a while, then sleeps) or sleeps at once (PASSIVE). On an idle
machine spinning saves the wake-up; on a busy one a spinning thread takes the core that
the thread it waits for needs. The policy is read once, when the OpenMP runtime starts,
so each measurement is a child process (``--child``) started with the policy in its
environment; the children of one round run the contenders in turn (the order reversed
every other round) and the medians of the rounds are reported.

Each row: one case (``threads.py``'s cases) at a thread count under one policy, its
images/s against the default policy at the same count (ratio > 1: the policy helps).

    python benchmarks/omp_wait.py --load 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench import Row, add_load_flag, rate_row, report_loads, under_loads

POLICIES = ("default", "PASSIVE", "ACTIVE")


def child(case_name: str, threads: int, repeats: int) -> None:
    """Print the median images/s of ``repeats`` timed passes of one case (after a warm-up)."""
    import torch

    from threads import CASES

    torch.set_num_threads(threads)
    case = CASES[case_name]
    run = case.make()
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"rate": case.images / statistics.median(seconds)}))


def measure_once(case_name: str, threads: int, policy: str, repeats: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", case_name, str(threads), str(repeats)]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, cwd=Path(__file__).parent
    )
    if done.returncode != 0:
        raise SystemExit(f"child {case_name} {threads} {policy} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rate"]


def measure(cases: list[str], thread_counts: list[int], rounds: int, repeats: int) -> list[Row]:
    rows = []
    for case_name in cases:
        for threads in thread_counts:
            rates: dict[str, list[float]] = {policy: [] for policy in POLICIES}
            for round_index in range(rounds):
                order = POLICIES if round_index % 2 == 0 else POLICIES[::-1]
                for policy in order:
                    rates[policy].append(measure_once(case_name, threads, policy, repeats))
            median = {policy: statistics.median(found) for policy, found in rates.items()}
            for policy in ("PASSIVE", "ACTIVE"):
                name = f"{case_name}, {threads} thread{'s' * (threads > 1)}: {policy} vs default"
                rows.append(rate_row(name, median[policy], median["default"], "images/s"))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["demo", "convnet"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="child processes per contender")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per child")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    add_load_flag(parser)
    args = parser.parse_args()
    results = under_loads(
        args.load, lambda load: measure(args.cases, args.threads, args.rounds, args.repeats)
    )
    report_loads(results, args.format, "omp_wait: OMP_WAIT_POLICY vs torch's default")


if __name__ == "__main__":
    main()
