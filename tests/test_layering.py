"""Imports go down: no cycles among retrofit's modules, and the bottom layers import nothing above.

Read from the source (module-level imports; ``if TYPE_CHECKING:`` blocks and imports inside
functions are not load-time edges), so the check needs no import of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retrofit"

# What each bottom layer may import from retrofit besides itself.
ALLOWED_BELOW = {
    "retrofit.layers": {"retrofit.errors"},
    "retrofit.graph": {"retrofit.errors", "retrofit.layers"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_imports(path: Path) -> set[str]:
    """retrofit modules imported when ``path`` is imported."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("retrofit"))
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("retrofit")
            ):
                found.add(node.module)
                # ``from retrofit import schedule`` imports a submodule
                found.update(f"{node.module}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _load_time_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    edges = {
        a: {b for b in deps if not b.startswith(a + ".") and not a.startswith(b + ".")}
        for a, deps in graph.items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            dfs(node, [node])
    assert not cycles, cycles


def test_bottom_layers_import_nothing_above():
    graph = _graph()
    wrong = {}
    for layer, allowed in ALLOWED_BELOW.items():
        for module, deps in graph.items():
            if module == layer or module.startswith(layer + "."):
                above = {
                    d
                    for d in deps
                    if not d.startswith(layer)
                    and not any(d == a or d.startswith(a + ".") for a in allowed)
                }
                if above:
                    wrong[module] = sorted(above)
    assert not wrong, wrong


def test_the_graph_walk_sees_real_edges():
    graph = _graph()
    assert "retrofit.graph.trace" in graph["retrofit.analysis"]
    assert "retrofit.techniques" in graph["retrofit.recipe"]
