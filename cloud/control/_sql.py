"""The control tables' named queries (``sql/queries.sql``), loaded once."""

from __future__ import annotations

from importlib import resources

from edge.store.queries import parse_queries

Q = parse_queries(resources.files("cloud.control").joinpath("sql", "queries.sql").read_text())
