"""The inspector's tables: one model's per-layer summary, and every registered model."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from cnnlab.errors import CnnlabError
from cnnlab.inspect.summary import Summary, summarize
from cnnlab.registry import create_model, list_models, model_info


def render_summary(summary: Summary, title: str) -> Group:
    """A rich table with one row per layer, followed by the totals."""
    table = Table(title=title, show_lines=False)
    for header in ("Layer", "Type", "Output shape", "Params", "Formula", "MACs", "RF", "Jump"):
        justify = "left" if header in ("Layer", "Type", "Output shape", "Formula") else "right"
        table.add_column(header, justify=justify, no_wrap=header != "Formula")
    for row in summary.layers:
        table.add_row(
            row.name,
            row.type,
            "x".join(map(str, row.output_shape)),
            f"{row.params:,}" if row.params else "-",
            row.formula,
            f"{row.macs:,}" if row.macs else "-",
            _pretty(row.rf),
            _pretty(row.jump),
        )
    rf = "-" if summary.receptive_field is None else f"{_pretty(summary.receptive_field)} px"
    totals = Text(
        f"Parameters:           {summary.total_params:,}\n"
        f"Trainable parameters: {summary.trainable_params:,}\n"
        f"MACs:                 {summary.total_macs:,} ({summary.total_macs / 1e9:.2f} G)\n"
        f"Weight memory:        {summary.weight_mb:,.2f} MB (parameters + buffers)\n"
        f"Receptive field:      {rf}"
    )
    return Group(table, totals)


def models_table(rows: list[dict[str, Any]]) -> Table:
    """``model_table_rows`` as a rich table."""
    table = Table(title="cnnlab models")
    for column in ("name", "family", "task", "params", "MACs", "input", "min input"):
        table.add_column(column, justify="right" if column in {"params", "MACs"} else "left")
    for row in rows:
        table.add_row(
            row["name"],
            row["family"],
            row["task"],
            f"{row['params']:,}",
            f"{row['macs'] / 1e9:.2f} G",
            "x".join(str(d) for d in row["input_size"]),
            str(row["min_size"]),
        )
    return table


def model_table_rows() -> list[dict[str, Any]]:
    """One row per registered model: name, family, task, params, MACs, sizes.

    Parameters are counted at the default settings (with as many input channels as the
    natural input has) and MACs at the model's natural input size. Models are built on the
    meta device (no memory, no initialisation) and only rebuilt on the CPU when their
    forward pass needs real data (e.g. box filtering).
    """
    rows = []
    for name in list_models():
        info = model_info(name)
        summary = summarize_cheaply(name, info.input_size)
        rows.append(
            {
                "name": name,
                "family": info.family,
                "task": info.task,
                "params": summary.total_params,
                "macs": summary.total_macs,
                "input_size": list(info.input_size),
                "min_size": info.min_size,
            }
        )
    return rows


def summarize_cheaply(name: str, input_size: tuple[int, int, int], **builder_args: Any) -> Summary:
    """The totals (``depth=0``) of the registered model ``name`` built with
    ``builder_args`` (``in_channels`` defaults to the input's), at ``input_size``: built on
    the meta device (no memory, no initialisation), rebuilt on the CPU only when its
    forward pass needs real data (e.g. box filtering)."""
    builder_args.setdefault("in_channels", input_size[0])
    with torch.device("meta"):
        model = create_model(name, **builder_args)
    try:
        return summarize(model, input_size, depth=0, device="meta")
    except CnnlabError:
        return summarize(create_model(name, **builder_args), input_size, depth=0)


def _pretty(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")
