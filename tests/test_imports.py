"""No import cycle among the modules of `atropos_core/` and `kernels/`.

Every import counts, also one inside a function (a cycle hidden in a function is still a cycle
a maintainer has to keep in mind). Imports are read with `ast`, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atropos_core", "kernels")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports (relative imports resolved; `from P import m`
    counts as importing P.m when m is a module)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != mod}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}   # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph(ROOT)
    assert "atropos_core.services" in graph and "kernels" in graph  # the walk found the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found(tmp_path):
    """The check itself can fail: a two-module cycle (one import inside a function, relative) and a
    three-module one through `from pkg import module` are reported."""
    pkg = tmp_path / "atropos_core"
    (pkg / "inference").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "inference" / "__init__.py").write_text("")
    (pkg / "services.py").write_text("from .procs import x\n")
    (pkg / "procs.py").write_text("def f():\n    from atropos_core.inference.launch import y\n")
    (pkg / "inference" / "launch.py").write_text("from .. import services\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("import os\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {"atropos_core.services", "atropos_core.procs",
                                                "atropos_core.inference.launch"}, cycle
    (pkg / "inference" / "launch.py").write_text("import json\n")
    assert find_cycle(import_graph(tmp_path)) is None
