"""The shape of the code: no import cycles between our modules, and core modules stay small.

The import graph is read from the source with `ast`, so an import inside a function counts as
much as one at the top of a module: a cycle that a function-level import hides still ties two
modules together, and moving that import up would break the first import of either. Imports
under `if TYPE_CHECKING:` are left out: they never run.

An edge goes to the module an import names (`import a.b`, `from a.b import x` and `from a import
b` with b a module all name `a.b`; `from a import x` with x a name names `a`) and to the
packages above it, since Python runs their `__init__` first: `from a.b import x` in `c.d` also
runs `a/__init__.py`. A module's own enclosing packages are not edges: they are already being
imported when it runs, or every package that re-exports its modules would be a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("periphery_core", "periphery_app")

MAX_LINES = 500
# Long by nature: one short FLOP formula per ONNX op, dispatched from one table.
EXEMPT = frozenset({"periphery_core/model/flops.py"})


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `packages` under `root`."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """For each module, the modules of `modules` it imports (see the module docstring)."""

    def known(name: str) -> str | None:  # the longest prefix of `name` that is one of ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                resolved = known(target)
                while resolved is not None and not (name + ".").startswith(resolved + "."):
                    if resolved in modules:
                        graph[name].add(resolved)
                    resolved = resolved.rpartition(".")[0] or None
    return graph


def components(graph: Mapping[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of two or more modules: each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return sorted(found, key=sorted)


def a_cycle(graph: Mapping[str, set[str]], component: frozenset[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path a, ..., a."""
    first = min(component)
    came_from: dict[str, str] = {}  # breadth-first from `first` back to itself
    frontier = [first]
    while first not in came_from:
        reached = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child not in came_from:
                    came_from[child] = node
                    reached.append(child)
        frontier = reached
    path = [first]
    while len(path) == 1 or path[-1] != first:
        path.append(came_from[path[-1]])
    return path[::-1]


def test_no_import_cycles() -> None:
    graph = import_graph(module_files(ROOT, PACKAGES))
    found = components(graph)
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(
        " -> ".join(a_cycle(graph, c)) for c in found)


def test_the_graph_sees_function_level_and_package_cycles_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    files = {
        "__init__.py": "",
        "model/__init__.py": "from pkg.model.analysis import analyze\n",
        "model/analysis.py": ("def analyze():\n    if True:\n"
                              "        from ..runtime.session import run\n"),
        "model/loading.py": "SIZE = 1\n",
        "runtime/__init__.py": "",
        "runtime/session.py": "from pkg.model import loading\n\ndef run():\n    pass\n",
        "runtime/types.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                             "    from pkg.model import analysis\nelse:\n    import json\n"),
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(module_files(tmp_path, ["pkg"]))
    assert graph == {
        "pkg": set(),
        "pkg.model": {"pkg.model.analysis"},
        "pkg.model.analysis": {"pkg.runtime", "pkg.runtime.session"},
        "pkg.model.loading": set(),
        "pkg.runtime": set(),
        # Importing pkg.model.loading runs pkg/model/__init__.py first: the hidden cycle.
        "pkg.runtime.session": {"pkg.model", "pkg.model.loading"},
        "pkg.runtime.types": set(),
    }
    found = components(graph)
    assert found == [frozenset({"pkg.model", "pkg.model.analysis", "pkg.runtime.session"})]
    assert a_cycle(graph, found[0]) == [
        "pkg.model", "pkg.model.analysis", "pkg.runtime.session", "pkg.model"]


def _line_counts() -> dict[str, int]:
    return {
        path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in module_files(ROOT, PACKAGES).values()
    }


def test_modules_stay_under_the_line_limit() -> None:
    counts = _line_counts()
    over = sorted(f"{path} ({n} lines)" for path, n in counts.items()
                  if n > MAX_LINES and path not in EXEMPT)
    assert not over, (f"modules over {MAX_LINES} lines; split them by what they do:\n"
                      + "\n".join(over))

