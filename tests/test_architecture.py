"""The package's shape: layers that import downward only (the import-linter contract in
pyproject.toml), no import cycle between two files, imports at the top of library modules,
and functions short enough to read top to bottom."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cellclass"
MAX_FUNCTION_LINES = 80
# Simulators draw a whole synthetic image in one pass; they are exempt from the length rule.
LENGTH_EXEMPT = ("data/simulate",)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("cellclass", *path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_the_layer_contract_holds() -> None:
    grimp = pytest.importorskip("grimp", reason="import-linter is in the dev extra: pip install -e '.[dev]'")
    assert grimp  # the contract itself is checked by import-linter's own command
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    done = subprocess.run([*command, "--no-cache"], capture_output=True, text=True, cwd=SRC.parents[1])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout, done.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files() -> None:
    grimp = pytest.importorskip("grimp", reason="import-linter is in the dev extra: pip install -e '.[dev]'")
    graph = grimp.build_graph("cellclass")
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("cellclass")}
             for m in graph.modules}
    # A package's __init__ re-exporting its modules is not a cycle between files.
    edges = {m: {i for i in targets if not m.startswith(i + ".")} for m, targets in edges.items()}
    assert _cycles(edges) == []


def _function_imports(tree: ast.Module) -> list[tuple[int, str]]:
    inner = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith("cellclass")):
                    inner.append((sub.lineno, sub.module or "."))
                elif isinstance(sub, ast.Import) and any(a.name.startswith("cellclass") for a in sub.names):
                    inner.append((sub.lineno, sub.names[0].name))
    return inner


def test_library_modules_import_cellclass_at_the_top() -> None:
    # The CLI imports the library inside its commands so that `cellclass --help` does not
    # load torch; everywhere else cellclass's own modules are imported at the top.
    late = [f"{path.relative_to(SRC)}:{line} imports {name} inside a function"
            for module, path in _modules().items() if not module.startswith("cellclass.cli")
            for line, name in _function_imports(ast.parse(path.read_text()))]
    assert late == []


def test_no_function_over_80_lines() -> None:
    long = []
    for path in _modules().values():
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(LENGTH_EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
