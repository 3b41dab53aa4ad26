"""What the local API's transport (``edge.terminal.service.httpserver``) says on the wire, free of
I/O: its own error answers, the path of a request target, h11's errors translated, and
exceptions described for the log without their text.

An exception's text, like h11's error messages, may quote the request (pydantic's
``input_value=``, a header line), card data included: neither reaches an answer or a log
line from here.
"""

from __future__ import annotations

import json
import traceback
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

import h11

__all__ = [
    "Rejected",
    "closing_answer",
    "describe_exception",
    "error_json",
    "protocol_error",
    "reason_phrase",
    "request_path",
    "too_large",
]


class Rejected(Exception):
    """A request the transport answers itself (4xx) before closing the connection."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def request_path(target: str) -> str:
    """The path of a request target, without its query string."""
    if not target.startswith("/") and "://" in target:  # absolute-form (RFC 9112 §3.2.2)
        return urlsplit(target).path or "/"
    return target.split("?", 1)[0].split("#", 1)[0]


def error_json(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def closing_answer(status: int, code: str, message: str) -> bytes:
    """A whole JSON error answer that closes the connection, written without h11 (its
    state may be an error, or no request arrived at all)."""
    payload = error_json(code, message)
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason_phrase(status), len(payload))
    )
    return head + payload


def too_large(max_body_bytes: int) -> Rejected:
    return Rejected(413, "body_too_large", f"request body over {max_body_bytes} bytes")


def protocol_error(exc: h11.RemoteProtocolError, max_header_bytes: int) -> Rejected:
    """h11's verdict on a request as our answer: 400, 431 or 501, its reason unquoted."""
    status = exc.error_status_hint
    if status == 431:
        message = f"request line and headers over {max_header_bytes} bytes"
        return Rejected(431, "headers_too_large", message)
    if status == 501:
        return Rejected(501, "not_implemented", _unquoted(exc))
    return Rejected(400, "malformed_http", _unquoted(exc))


def _unquoted(exc: h11.RemoteProtocolError) -> str:
    """h11's reason without the bytes it quotes ("illegal header line: bytearray(...)")."""
    text = str(exc)
    for mark in (": bytearray(", " bytearray(", ": b'", ': b"', " b'", ' b"'):
        text = text.split(mark, 1)[0]
    return text[:200] or "malformed request"


#: Frames of each exception in a chain that the log gets: the innermost, where it was raised.
_FRAMES = 6


def describe_exception(exc: BaseException) -> str:
    """An exception's type and innermost frames, then its causes', without any message:
    ``ValueError at api.py:120 _json_object < api.py:98 handle; from ...``."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)[-_FRAMES:]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        parts.append(f"{type(current).__qualname__} at {where or '?'}")
        cause = current.__cause__
        if cause is None and not current.__suppress_context__:
            cause = current.__context__
        current = cause
    return "; from ".join(parts)
