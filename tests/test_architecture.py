"""The layout's promises, checked on the source: no import cycle between modules (lazy imports
inside functions included; ``if TYPE_CHECKING:`` blocks excluded), and dependencies that point one
way: core <- nn <- models <- data / evaluation <- zoo <- lightning and the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for base in ("mdeq", "zoo"):
        for path in (REPO / base).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_only(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as pkg.sub)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_mdeq_or_zoo():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


ALLOWED = {
    "mdeq.core": {"mdeq.core"},
    "mdeq.nn": {"mdeq.core", "mdeq.nn"},
    "mdeq.models": {"mdeq.core", "mdeq.nn", "mdeq.models"},
    "mdeq.data": {"mdeq.data"},
    "mdeq.evaluation": {"mdeq.core", "mdeq.nn", "mdeq.data"},
    "mdeq.equilibrium_check": {"mdeq.core", "mdeq.nn", "mdeq.data", "mdeq.evaluation"},
}
"""What each lower layer may import (by first two name parts); zoo may import anything but the
Lightning layer and the CLI."""


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "mdeq" and len(parts) > 1 else parts[0]


def test_dependencies_point_one_way():
    wrong = []
    for a, targets in import_graph().items():
        for b in targets:
            la, lb = _layer(a), _layer(b)
            if la in ALLOWED and lb not in ALLOWED[la]:
                wrong.append(f"{a} -> {b}")
            if la == "zoo" and lb in ("mdeq.lightning", "mdeq.cli"):
                wrong.append(f"{a} -> {b}")
    assert wrong == []


def test_the_only_reference_from_the_library_to_the_zoo_is_the_timm_hook():
    """Imports by name (``importlib.import_module("zoo...")``) count too: outside the Lightning
    layer and the CLI, only mdeq.timm_hook names the zoo (it registers the zoo with timm once timm
    is imported, since timm offers no plugin entry point)."""
    found = []
    for name, path in _modules().items():
        if not name.startswith("mdeq") or _layer(name) in ("mdeq.lightning", "mdeq.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("zoo."):  # a module path
                found.append(name)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] == "zoo":
                    found.append(name)
    assert sorted(set(found)) == ["mdeq.timm_hook"]
