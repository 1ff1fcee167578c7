"""The package reads in pipeline stages: no import circles, no import of a downstream stage.

Imports are read from the source (ast), including those inside functions and ``TYPE_CHECKING``
blocks, so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cryodeploy"
#: stages in pipeline order; a module may import from its own stage and the ones before it
STAGES = (
    ("cryodeploy.errors", "cryodeploy.files", "cryodeploy.progress", "cryodeploy._version"),
    ("cryodeploy.io",),
    ("cryodeploy.imaging",),
    ("cryodeploy.models",),
    ("cryodeploy.training",),
    ("cryodeploy.export",),
    ("cryodeploy.backends",),
    ("cryodeploy.inference",),
    ("cryodeploy.verify",),
    ("cryodeploy.evaluation",),
    ("cryodeploy.sysinfo", "cryodeploy.cli", "cryodeploy.__main__", "cryodeploy"),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts ``a.b`` if a module)."""

    def known(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {known(a.name) for a in node.names if a.name.split(".")[0] == "cryodeploy"}
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    pkg = base
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    target = f"{pkg}.{target}" if target else pkg
                if target.split(".")[0] != "cryodeploy":
                    continue
                for a in node.names:
                    full = f"{target}.{a.name}"
                    out.add(full if full in mods else known(target))
        out.discard(mod)
        graph[mod] = out
    return graph


def _stage(mod: str) -> int:
    for i, stage in enumerate(STAGES):
        if any(mod == s or mod.startswith(s + ".") for s in stage if s != "cryodeploy"):
            return i
    assert mod == "cryodeploy", f"{mod} belongs to no stage"
    return len(STAGES) - 1


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    graph = _imports(_modules())
    assert len(graph) > 60  # the reader found the package
    assert _cycles(graph) == []


def test_a_circle_is_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_downstream_stage() -> None:
    graph = _imports(_modules())
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if _stage(t) > _stage(m))
    assert upward == []


def test_few_plain_modules_at_the_top() -> None:
    plain = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(plain) <= 8, plain
