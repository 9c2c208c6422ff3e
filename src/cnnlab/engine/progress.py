"""What a training run shows while it works: a progress bar and one line per epoch.

The bar (rich, on stderr, only on a terminal) reads the device-side running sums at most
four times a second, so it adds no per-step host sync.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch


def unwrapped(text: str) -> str:
    """``text`` with the lines ``wrapped`` split joined again."""
    return text.replace("\n  ", " ")


class Reporter:
    """Per-epoch progress bar and summary lines (both on stderr; none when ``quiet``)."""

    REFRESH_SECONDS = 0.25

    def __init__(self, quiet: bool, score_label: str | None = "top1") -> None:
        self.quiet = quiet
        self.score_label = score_label
        self.show_bar = not quiet and sys.stderr.isatty()
        self.progress = None
        self._widths: list[int] | None = None  # the epoch table's, once its header is out

    def start(self, description: str, total: int) -> None:
        if not self.show_bar:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(description, total=total, stats="")
        self.steps, self.started, self.shown = 0, time.perf_counter(), 0.0

    def step(
        self, seen: int, loss_sum: torch.Tensor, right: torch.Tensor, scored: torch.Tensor
    ) -> None:
        """One training step done: the running loss and score (read only when shown)."""

        def stats(now: float) -> str:
            text = f"loss {loss_sum.item() / seen:.3f}"
            if self.score_label:
                text += f"  {self.score_label} {100 * right.item() / max(1, scored.item()):.1f}%"
            return text + f"  {seen / (now - self.started):.0f} img/s"

        self.advance(stats)

    def advance(self, stats: Callable[[float], str]) -> None:
        """One step done; ``stats(now)`` gives the text beside the bar, asked for at most
        four times a second (it may read device tensors)."""
        if self.progress is None:
            return
        self.steps += 1
        now = time.perf_counter()
        if now - self.shown < self.REFRESH_SECONDS:
            return
        self.shown = now
        self.progress.update(self.task_id, completed=self.steps, stats=stats(now))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def line(self, text: str) -> None:
        """A message, wrapped at words to the terminal's width (80 when piped)."""
        if not self.quiet:
            print(wrapped(text), file=sys.stderr, flush=True)

    def epoch(self, cells: list[tuple[str, str]]) -> None:
        """One row of the epoch table, under its header (printed before the first row):
        fixed columns, as fastai's table, so that a row never exceeds 80 columns."""
        if self.quiet:
            return
        if self._widths is None:
            self._widths = [max(len(header), EPOCH_CELL) for header, _ in cells]
            print(_row([h for h, _ in cells], self._widths), file=sys.stderr, flush=True)
        print(_row([v for _, v in cells], self._widths), file=sys.stderr, flush=True)


EPOCH_CELL = 7  # the widest value an epoch column takes: "100/100", "2.5e-4", "100.0%"


def _row(values: list[str], widths: list[int]) -> str:
    # The epoch on the left, numbers to the right: no row starts with a space, as the
    # continuation of a wrapped message does.
    return "  ".join(
        v.ljust(w) if i == 0 else v.rjust(w)
        for i, (v, w) in enumerate(zip(values, widths, strict=True))
    )


def terminal_columns() -> int:
    """The width to write to: the terminal's; $COLUMNS, else 80, when piped."""
    import os
    import shutil

    if sys.stderr.isatty():
        return shutil.get_terminal_size().columns
    return int(os.environ.get("COLUMNS", "80")) if os.environ.get("COLUMNS", "").isdigit() else 80


def wrapped(text: str, width: int | None = None) -> str:
    """``text`` wrapped at word boundaries (never mid-word) to ``width``, continuation
    lines indented by two spaces (``unwrapped`` joins them again)."""
    import textwrap

    return "\n".join(
        textwrap.fill(
            line,
            width or terminal_columns(),
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        for line in text.splitlines() or [""]
    )


def short_float(value: float) -> str:
    """1e-3, 2.5e-4: the way people write learning rates."""
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"
