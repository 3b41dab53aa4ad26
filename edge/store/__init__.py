"""Stores by URL: a path or ``sqlite:///path`` opens SQLite here; other schemes come
from the ``tillflow.stores`` entry points (the cloud extra registers ``postgresql``),
so the terminal never imports the cloud."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from edge.engine.ports import Store
from edge.errors import ConfigError

#: Environment variable the entry points (CLI, daemon) read for the default store.
DATABASE_URL_ENV = "TILLFLOW_DATABASE_URL"


def open_store(url: str, *, synchronous: str = "FULL", **options: Any) -> Store:
    """Open the store ``url`` names, migrating it. ``synchronous`` applies to SQLite."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if not scheme and re.match(r"^\s*\w+\s*=", url):
        raise ConfigError(
            f"'{url}' looks like a libpq connection string, not a database URL",
            hint="write it as postgresql://USER@HOST:PORT/DBNAME",
        )
    if scheme in ("", "sqlite", "file"):
        from edge.store.sqlite import SqliteStore

        path = url.split("://", 1)[1] if scheme else url
        if scheme == "sqlite" and path.startswith("/"):
            path = path[1:] if path.startswith("//") else path  # sqlite:////abs, sqlite:///rel
        if not path:
            raise ConfigError(f"'{url}' names no database file")
        return SqliteStore(path, synchronous=synchronous, **options)  # type: ignore[arg-type]
    found = [ep for ep in entry_points(group="tillflow.stores") if ep.name == scheme]
    if not found:
        raise ConfigError(
            f"no store for '{scheme}://' URLs in this installation",
            hint="PostgreSQL needs the cloud extra: pip install 'tillflow[cloud]'",
        )
    store: Store = found[0].load()(url, **options)
    return store
