"""benchmarks/_bench.py's --load N: busy loops that run for the measurement and are always
stopped after it, also when the measurement fails."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _bench


def test_busy_loops_run_for_the_block_and_stop_after() -> None:
    with _bench.busy_loops(2, settle=0) as procs:
        assert len(procs) == 2
        assert all(proc.poll() is None for proc in procs)  # spinning
    assert all(proc.returncode is not None for proc in procs)


def test_busy_loops_stop_on_an_error_too() -> None:
    with pytest.raises(RuntimeError), _bench.busy_loops(1, settle=0) as procs:
        raise RuntimeError("the measurement failed")
    assert procs[0].returncode is not None


def test_under_loads_measures_idle_then_each_load(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    _bench.add_load_flag(parser)
    assert parser.parse_args([]).load == []
    loads = parser.parse_args(["--load", "1", "2"]).load
    seen = []

    def measure(load: int) -> list[_bench.Row]:
        seen.append(load)
        return [_bench.rate_row("x", 2.0, 1.0, "images/s")]

    monkeypatch.setattr(_bench, "SETTLE_SECONDS", 0)  # no waiting for the load average
    results = _bench.under_loads(loads, measure)
    assert seen == [0, 1, 2] and [r.load for r in results] == [0, 1, 2]
    assert "load average" in results[0].machine
    assert _bench.load_title("t", 0) == "t, idle"
    assert "--load 2" in _bench.load_title("t", 2)
