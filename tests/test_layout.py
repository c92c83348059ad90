"""The library's layout: no two modules import each other, at module level or inside functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffcli"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The library modules `path` imports anywhere (functions included), except under `if TYPE_CHECKING`."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for stmt in node.orelse:
                    self.visit(stmt)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            mod = node.module or ""
            if node.level:
                mod = ".".join(package[:len(package) - node.level + 1] + ([mod] if mod else []))
            for a in node.names:  # `from diffcli import checkpoint` imports the submodule, not the package
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). The package's `__init__` is left out: it
    re-exports `DiffPruner` and `DiffPruningCallback` lazily, in `__getattr__`, so importing it imports neither."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {m: _imports(p, m, modules) - {"diffcli"} for m, p in paths.items() if m != "diffcli"}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_two_library_modules_import_each_other():
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle_through_an_import_inside_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "diffcli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from diffcli.a import A\n    return A\n")
    (pkg / "a.py").write_text("from diffcli import b\nimport diffcli\nA = 1\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from diffcli.c import C\n"
                              "def f():\n    from .sub import d\n")
    (pkg / "c.py").write_text("from diffcli.b import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("def g():\n    from ..a import A\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert import_cycles() == [["diffcli.a", "diffcli.b", "diffcli.sub.d"]]  # not c: b imports it for types only
