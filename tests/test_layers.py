"""Data flows one way: files -> data -> tasks -> engine -> a run folder -> runs -> the CLI,
the web page and export. Checked on the import graph of src/cnnlab (``test_imports``):
nothing imports a layer above its own, even lazily, and nothing that runs a finished
model reaches the trainer."""

from __future__ import annotations

import pytest

from tests.test_imports import import_graph

GRAPH = import_graph()
# The list of tasks and its option declarations are leaves, as the registry is: the
# configuration reads a task's defaults from them, and every layer may.
DECLARATIONS = {"cnnlab.tasks", "cnnlab.tasks.options"}

# Each layer and the layers it must never reach (by module-name prefix).
ABOVE = {
    "cnnlab.data": ("cnnlab.tasks", "cnnlab.engine", "cnnlab.runs", "cnnlab.training"),
    "cnnlab.models": ("cnnlab.tasks", "cnnlab.engine", "cnnlab.runs", "cnnlab.training"),
    "cnnlab.tasks": ("cnnlab.engine", "cnnlab.runs", "cnnlab.training", "cnnlab.cli"),
    "cnnlab.engine": ("cnnlab.runs", "cnnlab.training", "cnnlab.cli", "cnnlab.serve"),
    # Inference: loading, predicting, serving and exporting never import the trainer.
    "cnnlab.runs": ("cnnlab.engine", "cnnlab.training", "cnnlab.lr_find"),
    "cnnlab.runtime": ("cnnlab.engine", "cnnlab.training", "cnnlab.lr_find"),
    "cnnlab.export": ("cnnlab.engine", "cnnlab.training", "cnnlab.lr_find", "cnnlab.cli"),
    "cnnlab.serve": ("cnnlab.engine", "cnnlab.training", "cnnlab.lr_find", "cnnlab.cli"),
}


def reachable(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for successor in GRAPH[stack.pop()]:
            if successor not in seen:
                seen.add(successor)
                stack.append(successor)
    return seen


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_no_layer_reaches_one_above_it(layer: str) -> None:
    modules = [m for m in GRAPH if m == layer or m.startswith(f"{layer}.")]
    assert modules, f"no module {layer}"
    for module in modules:
        above = (m for m in reachable(module) - DECLARATIONS if m.startswith(ABOVE[layer]))
        wrong = sorted(above)
        assert not wrong, f"{module} reaches {wrong}"


def test_the_engine_reaches_no_task_implementation() -> None:
    """The loop is handed a task; it imports only the declared metric spec of tasks."""
    implementations = {
        "cnnlab.tasks.classify",
        "cnnlab.tasks.classify_base",
        "cnnlab.tasks.multilabel",
        "cnnlab.tasks.segment",
        "cnnlab.tasks.detect",
    }
    for module in (m for m in GRAPH if m.startswith("cnnlab.engine")):
        assert not reachable(module) & implementations, module


def test_the_task_declarations_are_leaves() -> None:
    for module in DECLARATIONS:
        assert reachable(module) <= DECLARATIONS | {"cnnlab.errors"}, module
