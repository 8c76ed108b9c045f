"""The package's import graph, built from the source with `ast`: no circle (a module reached from itself), and no
module importing another's private name. A circle means two modules cannot be read (or changed) apart."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "src" / "talklora_exp"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports, anywhere in its body; "module imports private name" findings)."""
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    private = []
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dep = sub if sub in files else target
                    if dep in files and dep != mod:
                        graph[mod].add(dep)
                    if dep == target and alias.name.startswith("_") and target in files and target != mod:
                        private.append(f"{mod} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in files and a.name != mod}
    return graph, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _is_ancestor_package(a: str, b: str) -> bool:
    # `pkg/__init__.py` importing its own submodules (to re-export them) is not a circle a reader must untangle
    return b.startswith(a + ".")


def test_no_import_circle_and_no_private_imports():
    graph, private = import_graph()
    assert len(graph) > 30 and graph["talklora_exp.run"]  # the graph was built
    pruned = {m: {d for d in deps if not _is_ancestor_package(m, d)} for m, deps in graph.items()}
    cycle = _cycle(pruned)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    assert not private, private


def test_the_checker_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
