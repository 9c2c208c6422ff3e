"""The inspector: per-layer output size, parameters (with formula), MACs and receptive
field of any model (``summarize``), tables of them (``render``) and of the whole zoo
(``cache``). Names are imported on first use, so that ``cnnlab models`` can read its
cached table without importing torch."""

from importlib import import_module
from typing import Any

__all__ = [
    "LayerRow",
    "Summary",
    "model_table_rows",
    "models_table",
    "render_summary",
    "summarize",
    "summarize_model",
]

_LAZY = {
    "LayerRow": "cnnlab.inspect.rows",
    "Summary": "cnnlab.inspect.summary",
    "model_table_rows": "cnnlab.inspect.cache",
    "models_table": "cnnlab.inspect.cache",
    "render_summary": "cnnlab.inspect.render",
    "summarize": "cnnlab.inspect.summary",
    "summarize_model": "cnnlab.inspect.summary",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnlab.inspect' has no attribute {name!r}")
