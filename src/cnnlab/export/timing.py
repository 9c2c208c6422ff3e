"""Timing models against each other in one process, and the metric each is judged by.

``interleaved_calls`` runs every contender once per round, in an order that alternates
from round to round, so that all of them see the same machine load: on a busy machine the
ratios between them hold even when their absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

# The figure a task's evaluation report is judged by, in the order looked for: a
# classifier's top-1 (a multi-label one's exact-match ratio), a segmenter's mIoU, a
# detector's mAP@0.5. All are fractions; "points" are hundredths of them.
METRICS = (
    ("top1", "top-1"),
    ("exact_match", "exact match"),
    ("miou", "mIoU"),
    ("map50", "mAP@0.5"),
)


def headline_metric(report: dict[str, Any]) -> tuple[str, float]:
    """(name, value) of the figure ``report`` (``Run.evaluate``'s) is judged by."""
    for key, name in METRICS:
        if report.get(key) is not None:
            return name, float(report[key])
    raise KeyError(f"no metric among {[key for key, _ in METRICS]} in the report")


def interleaved_calls(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 2,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call of each contender over ``rounds`` rounds (fewer when
    ``budget_s`` runs out, at least three), after ``warmup`` untimed rounds; the order is
    reversed every other round."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            begun = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - begun)
        spent = time.perf_counter() - started
        if budget_s is not None and round_ >= 2 and spent > budget_s:
            break
    return times


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (linear between the nearest two)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]
