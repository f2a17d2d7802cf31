"""Import hygiene: each name is imported from the module that defines it, and no cycles.

A module that only re-exports a name (a shim) lets two copies of an API drift apart, and an
import cycle (even one hidden behind `TYPE_CHECKING` or a late import) means two modules are
one job split badly. Both are checked by reading the source, without importing anything.

`CHECKED` lists the packages held to it (all of them, the tests included). Every module is
parsed once for both tests, with the garbage collector paused: parsing the tree's 1.7 MB of
Python is nearly all these tests cost (about 0.5 s of CPU), and the collector, run on every
few thousand new AST nodes, would triple it.
"""

from __future__ import annotations

import ast
import functools
import gc
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_format", "precompute", "train", "heads", "tests")
#: Packages whose modules must not be imported through a re-export, nor sit in an import cycle.
CHECKED = ("cache_format", "heads", "precompute", "train", "tests")


@functools.cache
def _modules() -> dict[str, Path]:
    found = {}
    # Walk the packages only: a checkout made by `make` holds .venv (some 15,000 files of
    # Python), which a walk of ROOT would read twice per run for nothing.
    for path in (p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        found[".".join(rel.with_suffix("").parts).removesuffix(".__init__")] = path
    return found


@functools.cache
def _trees() -> dict[str, ast.Module]:
    """Every module's syntax tree, parsed once per session."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return {name: ast.parse(path.read_text()) for name, path in _modules().items()}
    finally:
        if paused:
            gc.enable()


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, nested ones included (imports inside functions count too); expressions
    are not visited, which makes this walk a tenth of `ast.walk`'s."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, field, None) or [])
        for part in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
            yield from _statements(part.body)


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements, with the bodies of `if` blocks (TYPE_CHECKING) and of `try`
    blocks (an optional dependency's fallback) included."""
    out: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.If):
            out.extend(_top_level(ast.Module(body=node.body + node.orelse, type_ignores=[])))
        elif isinstance(node, ast.Try):
            nested = [*node.body, *node.orelse, *node.finalbody,
                      *(stmt for handler in node.handlers for stmt in handler.body)]
            out.extend(_top_level(ast.Module(body=nested, type_ignores=[])))
        else:
            out.append(node)
    return out


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in _top_level(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_names_are_imported_from_the_module_that_defines_them() -> None:
    modules, trees = _modules(), _trees()
    wrong = []
    for importer, tree in trees.items():
        for node in _statements(tree.body):
            if not (isinstance(node, ast.ImportFrom) and node.module in trees):
                continue
            if not node.module.startswith(CHECKED):
                continue
            defined = _defined(trees[node.module])
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules or alias.name in defined:
                    continue  # a submodule, or defined there
                wrong.append(f"{importer}:{node.lineno} imports {alias.name} from {node.module}")
    assert not wrong, "names imported through a module that does not define them:\n" + "\n".join(
        wrong)


def test_no_import_cycles() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in _trees().items():
        deps = set()
        for node in _top_level(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        # A package's submodules import the package itself on the way: not an edge.
        graph[name] = {d for d in deps if d in modules and d != name
                       and not name.startswith(d + ".")}
    # One depth-first walk: an import graph has a cycle exactly when the walk meets a module
    # that is still on its path (a back edge); each such meeting is reported as its cycle.
    cycles: list[str] = []
    on_path: dict[str, bool] = {}  # True while on the current path, False once finished

    def visit(node: str, path: tuple[str, ...]) -> None:
        on_path[node] = True
        for dep in sorted(d for d in graph[node] if d.startswith(CHECKED)):
            if on_path.get(dep):
                cycles.append(" -> ".join((*path[path.index(dep):], dep)))
            elif dep not in on_path:
                visit(dep, (*path, dep))
        on_path[node] = False

    for start in sorted(m for m in graph if m.startswith(CHECKED)):
        if start not in on_path:
            visit(start, (start,))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))
