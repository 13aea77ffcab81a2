"""Imports go down: no cycles among retrofit's modules, the bottom layers import nothing above,
and the core (everything but the trainer, the CLI and compare) never imports the trainer.

Cycles and layers are read from the source (module-level imports; ``if TYPE_CHECKING:`` blocks
and imports inside functions are not load-time edges), so the check needs no import of the
package. The trainer check reads every import, lazy ones included, and also runs the README's own
calls in a fresh interpreter and looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retrofit"

# The pipeline's folders, in order (capture → analysis → plan → rewrite → verify): what each may
# import from retrofit besides itself. Nothing reaches forward to a later step.
_BOTTOM = {"retrofit.errors", "retrofit.layers"}
_PLANNING = {"retrofit.techniques", "retrofit.plan", "retrofit.edit", "retrofit.spec"}
_PLANNING |= {"retrofit.schedule", "retrofit.recipe", "retrofit.finetune_config"}
ALLOWED_BELOW = {
    "retrofit.layers": {"retrofit.errors"},
    "retrofit.capture": _BOTTOM,
    "retrofit.analysis": _BOTTOM | {"retrofit.capture"},
    "retrofit.rewrite": _BOTTOM | {"retrofit.capture", "retrofit.analysis"} | _PLANNING,
    "retrofit.verify": _BOTTOM | {"retrofit.capture", "retrofit.analysis", "retrofit.rewrite"},
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
    assert "retrofit.capture.trace" in graph["retrofit.analysis.context"]
    assert "retrofit.techniques" in graph["retrofit.recipe"]


# Above the core: the trainer and what drives it. Everything else is the core, which a user of
# ``retrofit.apply`` / ``lint`` / ``retrofit.models`` loads without the training stack.
ABOVE_CORE = ("retrofit.train", "retrofit.cli", "retrofit.cli_errors", "retrofit.compare")


def _all_imports(path: Path) -> set[str]:
    """Every retrofit module named by an import anywhere in ``path`` (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("retrofit"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrofit"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _above_core(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ABOVE_CORE)


def test_the_core_never_imports_the_trainer_even_lazily():
    wrong = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if _above_core(name):
            continue
        bad = sorted(m for m in _all_imports(path) if _above_core(m))
        if bad:
            wrong[name] = bad
    assert not wrong, wrong


_LOADED = """
import sys, torchvision, retrofit
retrofit.apply(torchvision.models.resnet18(), "recipes/sd.yaml")  # the README's example
retrofit.apply(torchvision.models.resnet18(), "recipes/dropblock.yaml")
retrofit.lint(torchvision.models.densenet121(drop_rate=0.2))
import retrofit.models, retrofit.integrations
print(sorted(m for m in sys.modules if m.split(".")[:2] == ["retrofit", "train"]
             or m in ("retrofit.cli", "retrofit.compare")))
"""


def test_apply_lint_and_models_load_no_trainer_module():
    root = PACKAGE.parent
    out = subprocess.run(
        [sys.executable, "-c", _LOADED], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
