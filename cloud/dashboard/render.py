"""Pages as HTML: the Jinja2 environment (templates in ``cloud/dashboard/templates``,
autoescaped), the filters the templates use (times, ages,
durations), the headers every page carries (a strict Content-Security-Policy: scripts,
styles and images from this origin only; no framing; no caching of fleet data), and the
parsing of a page's query string into typed values with a clear 400 on a bad one."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from cloud.dashboard.session import DashboardError, Session

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: Longest text a filter takes (a store, a group, a version).
MAX_TEXT = 200


def when(ts: Any) -> str:
    """Unix seconds as ``2026-12-04 19:02:11Z`` (blank for none)."""
    if not isinstance(ts, int | float) or not math.isfinite(ts):
        return "—"
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "—"


def duration(seconds: Any) -> str:
    """``42 s``, ``7 min``, ``3.2 h``, ``5 d``."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "—"
    s = abs(float(seconds))
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def make_env(now: Any) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cloud.dashboard", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )

    def ago(ts: Any) -> str:
        if not isinstance(ts, int | float) or not math.isfinite(ts):
            return "never"
        delta = now() - ts
        return "just now" if -5 < delta < 5 else f"{duration(delta)} ago"

    # svg: markup the server drew itself (cloud.dashboard.svg escapes every text in it)
    env.filters.update(when=when, ago=ago, duration=duration, svg=env.filters["safe"])
    return env


class Pages:
    """The templates of one app, rendered with the session's caller and CSRF token."""

    def __init__(self, now: Any) -> None:
        self.env = make_env(now)
        self.now = now

    def html(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        text = self.env.get_template(name).render(now=self.now(), **context)
        return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)

    def page(
        self, name: str, s: Session | None, *, status: int = 200, **context: Any
    ) -> HTMLResponse:
        return self.html(name, status, session=s, **context)


def pages(request: Request) -> Pages:
    found: Pages = request.app.state.dashboard_pages
    return found


class Params:
    """A page's query string, read field by field; a bad value is a 400 naming it."""

    def __init__(self, request: Request) -> None:
        self.raw = request.query_params
        if len(request.url.query) > 4000:
            raise DashboardError(400, "Bad request", "the query string is too long")

    def text(self, name: str, *, most: int = MAX_TEXT) -> str | None:
        value = self.raw.get(name)
        if value is None or value.strip() == "":
            return None
        value = value.strip()
        if len(value) > most or "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise DashboardError(400, "Bad request", f"{name}: at most {most} characters of text")
        return value

    def integer(self, name: str, *, low: int = 0, high: int = 2**62) -> int | None:
        value = self.text(name, most=20)
        if value is None:
            return None
        if not (value.isascii() and value.lstrip("-").isdigit()) or not low <= int(value) <= high:
            raise DashboardError(400, "Bad request", f"{name}: a whole number {low}-{high}")
        return int(value)

    def choice(self, name: str, choices: Sequence[str]) -> str | None:
        value = self.text(name)
        if value is not None and value not in choices:
            raise DashboardError(400, "Bad request", f"{name}: one of {', '.join(choices)}")
        return value

    def keep(self, **changes: Any) -> str:
        """This query string with ``changes`` (None drops a field), for links."""
        from urllib.parse import urlencode

        merged: dict[str, Any] = dict(self.raw)
        for k, v in changes.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        return "?" + urlencode(merged) if merged else "?"


def counts_of(rows: Sequence[tuple[Any, ...]]) -> Mapping[str, int]:
    return {str(k): int(v) for k, v in rows}


__all__ = ["SECURITY_HEADERS", "Pages", "Params", "duration", "make_env", "pages", "when"]
