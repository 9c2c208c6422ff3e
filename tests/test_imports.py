"""src/cnnlab has no import cycles: the registry is a leaf, data flows one way.

The graph is read from the source with ``ast``: every import statement, at module level or
inside a function (a lazy import closes a cycle as surely as an eager one, only later),
relative or absolute, with ``from cnnlab import x`` pointing at the submodule ``cnnlab.x``
when x is one. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import in ``tree``, however deeply nested, except under ``if TYPE_CHECKING:``
    (its ``else:`` branch runs and counts)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the file ``path`` (module ``name``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in import_statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
            continue
        base = node.module or ""
        if node.level:  # from . import x, from ..y import z
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.append(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        while target not in modules and "." in target:  # cnnlab.x.function -> cnnlab.x
            target = target.rpartition(".")[0]
        if target in modules and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {name: imported_modules(name, path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring the path)."""
    on_path: list[str] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" once every edge is seen

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        on_path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return [*on_path[on_path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        on_path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "cnnlab.registry" in graph
    # absolute at module level, and a submodule through ``from package import submodule``
    assert "cnnlab.errors" in graph["cnnlab.registry"]
    assert "cnnlab.models.builder" in graph["cnnlab.models.factory"]
    # the package's __init__ imports every model family
    assert {"cnnlab.models.resnet", "cnnlab.models.vgg"} <= graph["cnnlab.models"]
    # function-level: inspect/cache.py reads its table without torch, importing the zoo late
    assert "cnnlab.models.factory" in graph["cnnlab.inspect.cache"]


def test_relative_and_type_checking_imports_are_read_as_python_runs_them(tmp_path: Path) -> None:
    package = tmp_path / "cnnlab" / "sub"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .b import thing\n"
        "if TYPE_CHECKING:\n    from ..top import Kind\n"
        "def later():\n    from cnnlab import top\n"
    )
    modules = {"cnnlab", "cnnlab.sub", "cnnlab.sub.a", "cnnlab.sub.b", "cnnlab.top"}
    init = imported_modules("cnnlab.sub", package / "__init__.py", modules)
    assert init == {"cnnlab.sub.a"}
    assert imported_modules("cnnlab.sub.a", package / "a.py", modules) == {
        "cnnlab.sub.b",
        "cnnlab.top",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_src_cnnlab_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_registry_is_a_leaf_of_the_package() -> None:
    """registry.py imports nothing of cnnlab but its errors: models, weights and every
    consumer may import it."""
    assert import_graph()["cnnlab.registry"] <= {"cnnlab", "cnnlab.errors"}
