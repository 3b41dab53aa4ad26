"""The rollouts' named queries (``sql/queries.sql``), loaded once."""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg

from edge.store.queries import parse_queries

Conn = psycopg.Connection[tuple[Any, ...]]

Q = parse_queries(resources.files("cloud.rollouts").joinpath("sql", "queries.sql").read_text())
