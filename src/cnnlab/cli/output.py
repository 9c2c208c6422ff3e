"""How the command handlers print: one JSON document (``--format json``), or a table fitted
to the terminal (rich's console)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from cnnlab.tables import FittedTable

_UNLIMITED = 10_000  # the width of a --wide console: lines as long as they need


def print_json(document: object) -> None:
    """``document`` as one JSON document on stdout; a NaN or infinity (NaN weights, a
    diverged loss) is printed as null, with a warning on stderr, since JSON has neither."""
    from cnnlab.files import json_text

    text, replaced = json_text(document)
    sys.stdout.write(text + "\n")
    if replaced:
        print(
            f"warning: {replaced} value(s) were NaN or infinite and are printed as null",
            file=sys.stderr,
        )


def new_console(wide: bool = False) -> Console:
    """The terminal, at its width; piped output at $COLUMNS, else 80 (rich's rule).
    ``wide`` (``--wide``): no limit, every column shown, lines as long as they need."""
    from rich.console import Console  # imported here so `cnnlab --help` starts fast

    return Console(width=_UNLIMITED) if wide else Console()


def console_width(console: Console) -> int | None:
    """The width tables are fitted to; None under ``--wide`` (no limit)."""
    return None if console.width >= _UNLIMITED else console.width


def print_table(fitted: FittedTable, console: Console) -> None:
    """A ``tables.FittedTable``, and under it the line naming the columns it left out."""
    console.print(fitted.table)
    if fitted.hidden:
        console.print(fitted.hidden_line(), style="dim")
