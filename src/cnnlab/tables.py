"""Tables that fit the terminal the way rich's own do, without ever cutting a number.

Every table command (``models``, ``compare``, eval's per-class table) declares its columns
with the order in which they give way: at a narrow width the least important columns are
left out whole (and a line under the table names them and says that ``--wide`` shows
all), never squeezed into ``138,357,5…``; the first column, which says what the row is, and
every number left in are shown whole.

A leaf module (it imports only rich), so that every layer may draw its tables with it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.table import Table

# rich's default box: one space of padding each side of a cell, one rule between cells
# and one at each edge.
_PADDING = 2
_RULE = 1


@dataclass(frozen=True)
class Column:
    """A column: its header, alignment, and when it gives way at narrow widths
    (``drop``: 0 never; otherwise higher numbers go first)."""

    header: str
    justify: Literal["left", "right"] = "right"
    drop: int = 0


@dataclass
class FittedTable:
    """The rich table to print and the headers left out to fit the width."""

    table: Table
    hidden: list[str]
    width: int | None

    def hidden_line(self) -> str:
        """``hidden at 80 columns: FLOPs, MACs x; --wide shows all``, or ''."""
        if not self.hidden:
            return ""
        return f"hidden at {self.width} columns: {', '.join(self.hidden)}; --wide shows all"


def table_width(widths: Sequence[int]) -> int:
    """Characters a table of columns ``widths`` wide (their content) takes."""
    return sum(w + _PADDING for w in widths) + _RULE * (len(widths) + 1)


def fit_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    width: int | None,
) -> FittedTable:
    """The table of ``rows`` (cells as text) within ``width`` characters (None: any width),
    leaving out columns by their ``drop`` order until every kept cell fits whole."""
    needed = [
        max([len(column.header), *(len(row[i]) for row in rows)])
        for i, column in enumerate(columns)
    ]
    kept = list(range(len(columns)))
    if width is not None:
        for index in sorted(
            (i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop
        ):
            if table_width([needed[i] for i in kept]) <= width:
                break
            kept.remove(index)
    table = Table(title=title)
    for i in kept:
        column = columns[i]
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=True,
            min_width=needed[i],
            overflow="fold",  # only if even the kept columns overflow: folded, never cut
        )
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    hidden = [c.header for i, c in enumerate(columns) if i not in kept]
    return FittedTable(table, hidden, width)


def terminal_width() -> int:
    """The terminal's width; $COLUMNS, else 80, when the output is piped (rich's rule)."""
    return Console().width


def render_plain(fitted: FittedTable) -> str:
    """The table (and the line naming what it left out) as text, at its width."""
    buffer = io.StringIO()
    width = fitted.width or 10_000
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(fitted.table)
    if fitted.hidden:
        console.print(fitted.hidden_line(), soft_wrap=fitted.width is None)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
