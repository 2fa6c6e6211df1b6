"""The package's import graph has no cycle.

Rule: every import inside mambadeploy/ counts, the function-level ("lazy") ones included: a lazy import that closes a
circle still couples two modules both ways, and hides an order-of-import bug until some entry point imports them in the
other order. Not counted: imports under `if TYPE_CHECKING:` (never run), and a module importing one of its own parent
packages (Python imports the parents first anyway; an __init__ re-exporting its children is the usual shape).
A cycle is broken by moving the shared piece down into a module both can import (e.g. models.model.empty_model,
parallel.ranks.rank_runner).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mambadeploy

PACKAGE_DIR = Path(mambadeploy.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ["mambadeploy", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _targets(mod: str, path: Path, node, mods) -> list[str]:
    """The package modules an import statement of `mod` loads (a `from pkg import sub` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{node.module}" if node.module else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                continue
            for target in _targets(mod, path, node, mods):
                while target not in mods and "." in target:  # `import a.b.c` / `from a.b import name`
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != mod and not mod.startswith(target + "."):
                    edges.add(target)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
    for root, children_of_root in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(children_of_root)))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_find_cycles_sees_a_lazy_circle():
    """The checker itself: a two-module circle and a three-module one are found, a chain is not."""
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_function_level_imports():
    """models.checkpoint loads the loaders lazily (inside _loader): those edges must be in the graph."""
    graph = import_graph()
    assert "mambadeploy.models.loaders.hf" in graph["mambadeploy.models.checkpoint"]
    assert "mambadeploy.models.model" in graph["mambadeploy.models.loaders.hf"]


def test_package_import_graph_has_no_cycle():
    cycles = find_cycles(import_graph())
    for cycle in cycles:
        print("import cycle:", " <-> ".join(cycle))
    assert not cycles, f"{len(cycles)} import cycle(s) in mambadeploy/: {cycles}"
