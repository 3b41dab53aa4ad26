"""The layer rules of DESIGN.md, checked on the source (``make check`` runs this file).

Each package may import the standard library, the packages listed for it, and the
project packages below it; nothing in ``edge`` imports ``cloud``; the engine imports no
store and no runtime; a store imports no runtime; no package in ``CYCLE_FREE`` has an
import cycle among its modules (subpackages included). Imports under ``if
TYPE_CHECKING:``, and imports inside functions, count too (a rule that holds only at
run time is a rule a refactor breaks quietly).

``python tests/support/layers.py`` prints each violation as ``file:line: message`` and
exits 1 when there is one.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Third-party imports the terminal may use: they are all the frozen binary carries.
#: h11 is httpx's own HTTP/1.1 parser, used directly by the local API's transport.
EDGE_THIRD_PARTY = {"apsw", "yaml", "pydantic", "pydantic_core", "cryptography", "httpx", "h11"}

#: (source folder, import name, project packages it may import, third-party it may import)
PACKAGES: list[tuple[str, str, set[str], set[str]]] = [
    ("edge", "edge", {"edge"}, EDGE_THIRD_PARTY),
    ("sync", "sync", {"sync", "edge"}, EDGE_THIRD_PARTY),
    (
        "cloud",
        "cloud",
        {"cloud", "sync", "edge"},
        EDGE_THIRD_PARTY
        | {"psycopg", "psycopg_pool", "celery", "kombu", "fastapi", "starlette", "uvicorn"}
        | {"prometheus_client", "jinja2"},
    ),
    # The simulators reach the cloud only through its processes, API and CLI (and its
    # dashboard through a browser: hwsim.screenshots drives Chromium with playwright).
    ("hardware-sim", "hwsim", {"hwsim", "edge", "sync"}, EDGE_THIRD_PARTY | {"playwright"}),
]

#: Modules of ``edge`` that must not import others of ``edge`` (module prefix -> banned).
INNER: list[tuple[str, tuple[str, ...]]] = [
    ("edge.engine", ("edge.store", "edge.terminal", "edge.cli", "edge.examples")),
    ("edge.store", ("edge.terminal", "edge.cli")),
]

PROJECT = {"edge", "sync", "cloud", "hwsim"}

#: Packages with no import cycle among their modules, each with its subpackages. An edge
#: goes to the module named: ``from pkg import mod`` to ``pkg.mod`` when that is a
#: module, else to ``pkg`` (its ``__init__``); the implicit import of a parent package
#: is not an edge (every submodule has it, and it is not what a cycle is made of).
CYCLE_FREE = ("edge.engine", "edge.store", "edge.terminal", "cloud", "sync", "hwsim")


def _module_name(root: Path, package: str, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, _from_module(node, module, is_package)


def _from_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` statement in ``module`` imports from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _sources(repo: Path) -> Iterator[tuple[str, str, Path]]:
    """(import name of the top package, module name, path) of every project module."""
    for folder, package, _, _ in PACKAGES:
        for path in sorted((repo / folder).rglob("*.py")):
            yield package, _module_name(repo / folder, package, path), path


def _edges(
    tree: ast.AST, module: str, is_package: bool, known: set[str]
) -> Iterator[tuple[int, str]]:
    """(line, project module) of every import in ``tree`` that names a module of ``known``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _from_module(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                if target in known:
                    yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                # ``import a.b.c`` binds ``a`` but runs ``a.b.c``: the edge is to it
                if alias.name in known:
                    yield node.lineno, alias.name


def _cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one,
    each starting at its smallest module name, with the component's other modules;
    Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(component)
    cycles = []
    for component in components:
        start = min(component)
        # shortest way back to ``start`` inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child == start:
                        found = node
                        break
                    if child in component and child not in previous:
                        previous[child] = node
                        following.append(child)
                if found is not None:
                    break
            frontier = following
        assert found is not None  # a strongly connected component leads back
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycle = [*reversed(path), start]
        cycles.append((cycle, sorted(component - set(cycle))))
    return sorted(cycles)


def cycle_problems(repo: Path = REPO) -> list[str]:
    """Every import cycle inside a package of ``CYCLE_FREE``, as ``file:line: message``
    (the line of the cycle's first import)."""
    sources = list(_sources(repo))
    known = {module for _, module, _ in sources}
    paths = {module: path for _, module, path in sources}
    graph: dict[str, dict[str, int]] = {module: {} for module in known}
    for _, module, path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for line, target in _edges(tree, module, path.name == "__init__.py", known):
            graph[module].setdefault(target, line)
    problems = []
    for scope in CYCLE_FREE:

        def inside(name: str, scope: str = scope) -> bool:
            return name == scope or name.startswith(scope + ".")

        sub = {
            m: {t: line for t, line in edges.items() if inside(t)}
            for m, edges in graph.items()
            if inside(m)
        }
        for cycle, others in _cycles(sub):
            first, second = cycle[0], cycle[1]
            where = f"{paths[first].relative_to(repo)}:{sub[first][second]}"
            also = f" (tangled with it: {', '.join(others)})" if others else ""
            problems.append(f"{where}: import cycle in {scope}: {' -> '.join(cycle)}{also}")
    return problems


def check(repo: Path = REPO) -> list[str]:
    """Every violation, as ``file:line: message``."""
    stdlib = set(sys.stdlib_module_names)
    problems: list[str] = []
    for folder, package, project_ok, third_ok in PACKAGES:
        for path in sorted((repo / folder).rglob("*.py")):
            module = _module_name(repo / folder, package, path)
            tree = ast.parse(path.read_text(), str(path))
            for line, name in _imports(tree, module, path.name == "__init__.py"):
                top = name.split(".")[0]
                where = f"{path.relative_to(repo)}:{line}"
                if top in stdlib or top == "__future__":
                    continue
                if top in PROJECT:
                    if top not in project_ok:
                        problems.append(f"{where}: {package} may not import {top} ({name})")
                    for prefix, banned in INNER:
                        if module.startswith(prefix) and name.startswith(banned):
                            problems.append(f"{where}: {prefix} may not import {name}")
                elif top not in third_ok:
                    problems.append(f"{where}: {package} may not import third-party {name}")
    return problems + cycle_problems(repo)


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"layers: {len(problems)} violation(s)" if problems else "layers: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
