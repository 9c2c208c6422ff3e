"""The inspector: per-layer output size, parameters (with formula), MACs and receptive
field of any model (``summarize``), and tables of them (``render``)."""

from cnnlab.inspect.render import (
    model_table_rows,
    models_table,
    render_summary,
    summarize_cheaply,
)
from cnnlab.inspect.summary import LayerRow, Summary, summarize, summarize_model

__all__ = [
    "LayerRow",
    "Summary",
    "model_table_rows",
    "models_table",
    "render_summary",
    "summarize",
    "summarize_cheaply",
    "summarize_model",
]
