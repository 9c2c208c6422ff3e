"""The inspector's table of one model's per-layer summary (text, rich and HTML)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from rich.console import Group
from rich.text import Text

from cnnlab.inspect.flops import FLOPS_LEGEND
from cnnlab.inspect.memory import MEMORY_LEGEND
from cnnlab.inspect.receptive_field import sees_whole_input
from cnnlab.inspect.sizes import UNCHANGED

if TYPE_CHECKING:  # summary.py imports this module to print itself
    from cnnlab.inspect.summary import Summary

_COLUMNS = ("Layer (type)", "Output", "Params", "MACs", "FLOPs", "RF", "Jump")
_SAVED = "Saved MB"  # the column of activation memory, when the summary has it
_FORMULAS = ("Size", "Params formula")
_GAP = 2


def render_summary(
    summary: Summary, title: str, width: int | None = None, wide: bool | None = None
) -> Group:
    """The per-layer table and the totals, for a console ``width`` columns wide (None: no
    limit, as for a file).

    Wide: one line per layer, the size and parameter formulas in the last two columns.
    When that does not fit (``wide=None`` decides) each layer takes a second, dimmed line
    holding its formulas, wrapped to the width, so that no number is ever cut.
    """
    columns = (*_COLUMNS, _SAVED) if summary.memory is not None else _COLUMNS
    cells = [_cells(row, len(columns), summary.input_size) for row in summary.layers]
    widths = [max(len(c) for c in column) for column in zip(columns, *cells, strict=True)]
    formulas = [(row.size_formula, row.formula) for row in summary.layers]
    formula_widths = [
        max(len(f) for f in column) for column in zip(_FORMULAS, *formulas, strict=True)
    ]
    needed = sum(widths) + sum(formula_widths) + _GAP * (len(widths) + 1)
    if wide is None:
        wide = width is None or needed <= width
    if not wide and width is not None:  # the name column gives way; numbers never do
        others = sum(widths[1:]) + _GAP * (len(widths) - 1)
        widths[0] = max(min(widths[0], width - others), len(_COLUMNS[0]))
    header = _line(columns, widths)
    if wide:
        header += " " * _GAP + _line(_FORMULAS, formula_widths, right=())
    lines = [Text(title, style="bold"), Text(header, style="bold"), Text("-" * len(header))]
    for row_cells, (size, params) in zip(cells, formulas, strict=True):
        if wide:
            extra = " " * _GAP + _line((size, params), formula_widths, right=())
            lines.append(Text(_line(row_cells, widths) + extra))
            continue
        name, *numbers = row_cells
        if len(name) > widths[0]:  # a long name on its own line, the numbers under it
            lines.append(Text(name))
            name = ""
        lines.append(Text(_line((name, *numbers), widths)))
        detail = "  ·  ".join(
            f"{label}: {text}"
            for label, text in (("size", size), ("params", params))
            if text and text != UNCHANGED
        )
        for part in textwrap.wrap(detail, max((width or 100) - 4, 20)):
            lines.append(Text("    " + part, style="dim"))
    return Group(*lines, Text(""), _totals(summary, width))


def render_text(summary: Summary, width: int = 100, title: str = "") -> str:
    """``render_summary`` as plain text (no colours)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(render_summary(summary, title, width=width))
    return buffer.getvalue()


def render_html(summary: Summary) -> str:
    """The per-layer table and the totals as HTML (a notebook's rich display)."""
    from html import escape

    heads = (
        "Layer", "Type", "Output", "Size", "Params", "Params formula", "MACs", "FLOPs", "RF",
        "Jump",
    )  # fmt: skip
    body = []
    for row in summary.layers:
        rf = _cells(row, len(_COLUMNS), summary.input_size)[5]
        values = (
            row.name,
            row.type,
            "x".join(map(str, row.output_shape)),
            row.size_formula,
            f"{row.params:,}",
            row.formula,
            f"{row.macs:,}",
            f"{row.flops:,}",
            rf,
            _pretty(row.jump),
        )
        body.append("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in values) + "</tr>")
    totals = escape(_totals(summary).plain).replace("\n", "<br>")
    head = "".join(f"<th>{h}</th>" for h in heads)
    return f"<table><tr>{head}</tr>{''.join(body)}</table><p>{totals}</p>"


def _cells(row, count: int, input_size: tuple[int, ...]) -> tuple[str, ...]:
    rf, jump = _pretty(row.rf), _pretty(row.jump)
    if row.rf is not None and row.rf_min is not None and row.rf_min != row.rf:
        rf = f"{_pretty(row.rf_min)}-{rf}"
    if sees_whole_input(row, input_size):  # a global pool: its window overhangs the input
        rf, jump = "all", "-"
    cells = (
        f"{row.name} ({row.type})",
        "x".join(map(str, row.output_shape)) or "-",
        f"{row.params:,}" if row.params else "-",
        f"{row.macs:,}" if row.macs else "-",
        f"{row.flops:,}" if row.flops else "-",
        rf,
        jump,
        f"{row.activation_bytes / 1e6:,.2f}" if row.activation_bytes else "-",
    )
    return cells[:count]


def _line(values, widths, right=(2, 3, 4, 5, 6, 7)) -> str:
    return (
        (" " * _GAP)
        .join(
            value.rjust(w) if i in right else value.ljust(w)
            for i, (value, w) in enumerate(zip(values, widths, strict=True))
        )
        .rstrip()
    )


def _totals(summary: Summary, width: int | None = None) -> Text:
    """The footer, each entry wrapped at words to ``width`` under its value."""
    rf = "-"
    if summary.receptive_field is not None:
        rf = f"{_pretty(summary.receptive_field)} px"
        low = summary.receptive_field_min
        if low is not None and low != summary.receptive_field:
            rf = f"{_pretty(low)} to {rf} (it depends on the output position)"
        rf += f", output stride {_pretty(summary.output_stride)}"
        if summary.features is not None and summary.features.note():
            rf += f", {summary.features.note()}"
    flops = summary.total_flops
    share = summary.dense_params / summary.total_params if summary.total_params else 0.0
    lines = [
        f"Parameters:           {summary.total_params:,}",
        f"Trainable parameters: {summary.trainable_params:,}",
        f"In dense layers:      {summary.dense_params:,} ({share:.0%} of the parameters)",
        f"MACs:                 {summary.total_macs:,} ({summary.total_macs / 1e9:.2f} G)",
        f"FLOPs:                {flops:,} ({flops / 1e9:.2f} G)",
        f"Weight memory:        {summary.weight_mb:,.2f} MB (parameters + buffers)",
        f"Receptive field:      {rf}",
        *_memory_lines(summary),
        f"Not counted:          {_not_counted(summary.not_counted)}",
        f"Legend: {FLOPS_LEGEND}.",
    ]
    if summary.memory is not None:
        lines.append(f"Legend: {MEMORY_LEGEND}.")
    if width is not None:
        lines = [
            wrapped
            for line in lines
            for wrapped in textwrap.wrap(
                line, width, subsequent_indent=" " * (8 if line.startswith("Legend") else 22)
            )
        ]
    return Text("\n".join(lines))


def _not_counted(ops: dict[str, int]) -> str:
    """``aten.round (1x), aten.upsample_bilinear2d (2x)``; ``none`` when all were."""
    return ", ".join(f"{name} ({times}x)" for name, times in ops.items()) or "none"


def _memory_lines(summary: Summary) -> list[str]:
    memory = summary.memory
    if memory is None:
        return []
    dtypes = ", ".join(
        f"{name} {size / 1e6:,.2f}" for name, size in memory.activation_by_dtype.items()
    )
    lines = [
        f"Activations saved:    {memory.activations / 1e6:,.2f} MB at batch {memory.batch_size}"
        f" ({dtypes or 'none'}) — column {_SAVED}",
    ]
    if summary.train:
        parts = (
            ("weights", memory.weights),
            ("gradients", memory.gradients),
            (f"{memory.optimizer} state", memory.optimizer_state),
            ("activations", memory.activations),
            ("largest transient", memory.largest_transient),
            ("runtime overhead", memory.overhead),
        )
        lines += [
            f"Training step:        {memory.training_step / 1e6:,.2f} MB at batch"
            f" {memory.batch_size} (peak; {memory.optimizer})",
            "  of which at most:   " + ", ".join(f"{n} {b / 1e6:,.2f}" for n, b in parts) + " MB",
        ]
    return lines


def _pretty(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")
