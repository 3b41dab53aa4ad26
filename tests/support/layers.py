"""The layer rules of DESIGN.md, checked on the source (``make check`` runs this file).

Each package may import the standard library, the packages listed for it, and the
project packages below it; nothing in ``edge`` imports ``cloud``; the engine imports no
store and no runtime; a store imports no runtime. Imports under ``if TYPE_CHECKING:``
count too (a rule that holds only at run time is a rule a refactor breaks quietly).

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
    # The simulators reach the cloud only through its processes, API and CLI.
    ("hardware-sim", "hwsim", {"hwsim", "edge", "sync"}, EDGE_THIRD_PARTY),
]

#: Modules of ``edge`` that must not import others of ``edge`` (module prefix -> banned).
INNER: list[tuple[str, tuple[str, ...]]] = [
    ("edge.engine", ("edge.store", "edge.terminal", "edge.cli", "edge.examples")),
    ("edge.store", ("edge.terminal", "edge.cli")),
]

PROJECT = {"edge", "sync", "cloud", "hwsim"}


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
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name


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
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"layers: {len(problems)} violation(s)" if problems else "layers: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
