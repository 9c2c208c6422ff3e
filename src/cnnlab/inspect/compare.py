"""Models side by side: depth, parameters, where they live, cost and field of view.

``compare(specs)`` summarises each model (``cnnlab.inspect.specs`` names them) and gives
one row per model: the depth in layers with weights along the longest path, the parameters
and the share of them in fully connected layers, the MACs and FLOPs, the receptive field and
output stride of the last feature map (the last output with more than one position, before
any global pool), the estimated memory of an AdamW training step at ``batch``
(``memory.py``), and parameters and MACs relative to the first model. The ILSVRC story reads
straight off it: each winner deeper than the last, and after AlexNet and VGG (whose dense
layers hold most of their weights) far fewer parameters.
"""

from __future__ import annotations

from typing import Any

from cnnlab.inspect.memory import estimate_memory
from cnnlab.inspect.specs import summarize_spec
from cnnlab.inspect.summary import plain
from cnnlab.tables import Column, FittedTable, fit_table


def compare(
    specs: list[str],
    input_size: tuple[int, int, int] | None = None,
    kwargs: dict[str, Any] | None = None,
    batch: int = 1,
) -> list[dict[str, Any]]:
    """One row per model, in the order given (see the module doc for the columns)."""
    rows = []
    for spec in specs:
        model, summary, size = summarize_spec(spec, kwargs, input_size)
        rows.append(
            {
                "model": spec,
                "input": list(size),
                "depth": summary.depth,
                "params": summary.total_params,
                "fc_share": summary.dense_params / max(summary.total_params, 1),
                "macs": summary.total_macs,
                "flops": summary.total_flops,
                # One definition with ``summary`` (``receptive_field.feature_field``).
                "receptive_field": plain(summary.receptive_field),
                "output_stride": plain(summary.output_stride),
                "batch": batch,
                "training_step_bytes": estimate_memory(model, size, batch).training_step,
            }
        )
    first = rows[0] if rows else None
    for row in rows:
        row["params_vs_first"] = row["params"] / first["params"] if first["params"] else None
        row["macs_vs_first"] = row["macs"] / first["macs"] if first["macs"] else None
    return rows


# The columns of ``compare_table``, and the order in which they give way at narrow widths.
def _columns(batch: int) -> list[Column]:
    return [
        Column("model", "left"),
        Column("input", drop=5),
        Column("depth"),
        Column("params"),
        Column("in FC", drop=2),
        Column("MACs"),
        Column("FLOPs", drop=6),
        Column("RF"),
        Column("stride", drop=3),
        Column(f"train MB @{batch}", drop=4),
        Column("params x", drop=8),
        Column("MACs x", drop=7),
    ]


def compare_table(rows: list[dict[str, Any]], width: int | None = None) -> FittedTable:
    """``compare``'s rows as a rich table within ``width`` columns (``tables.fit_table``)."""
    batch = rows[0]["batch"] if rows else 1
    cells = [
        (
            row["model"],
            "x".join(map(str, row["input"])),
            str(row["depth"]),
            f"{row['params']:,}",
            f"{row['fc_share']:.0%}",
            f"{row['macs'] / 1e9:.3g} G",
            f"{row['flops'] / 1e9:.3g} G",
            _number(row["receptive_field"]),
            _number(row["output_stride"]),
            f"{row['training_step_bytes'] / 1e6:,.0f}",
            _ratio(row["params_vs_first"]),
            _ratio(row["macs_vs_first"]),
        )
        for row in rows
    ]
    return fit_table("models side by side", _columns(batch), cells, width)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
