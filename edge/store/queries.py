"""Named SQL queries kept in ``.sql`` files, and numbered migrations beside them.

A query file is a list of blocks, each headed ``-- name: NAME`` and a one-line
description comment. Bodies are passed to the driver whole; we never split SQL on ``;``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """``{name: sql}`` from a query file; a duplicate name is an error."""
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = "\n".join(
            ln for ln in text[m.end() : end].strip().splitlines() if not ln.startswith("--")
        ).strip()
        name = m.group("name")
        if name in out:
            raise ValueError(f"query '{name}' is defined twice")
        out[name] = body
    return out


def load_queries(dialect: str, package: str = "edge.store") -> dict[str, str]:
    text = resources.files(package).joinpath(f"sql/{dialect}/queries.sql").read_text()
    return parse_queries(text)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str, package: str = "edge.store") -> list[Migration]:
    """Numbered migrations ``NNNN_name.sql`` of a dialect, in order; numbers must be 1..n."""
    folder = resources.files(package).joinpath(f"sql/{dialect}/migrations")
    found = []
    for entry in folder.iterdir():
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    if [mig.version for mig in found] != list(range(1, len(found) + 1)):
        raise ValueError(
            f"{dialect} migrations are not numbered 1..n: {[m.version for m in found]}"
        )
    return found


def load_schema(dialect: str, package: str = "edge.store") -> str:
    return resources.files(package).joinpath(f"sql/{dialect}/schema.sql").read_text()
