"""The device side's errors, rooted in ``edge.errors.TillflowError`` like every other::

    SyncError                   (sync_error) talking to the control plane failed
    ├── SyncUnavailable         (sync_unavailable) unreachable, timed out, 5xx/429: retry
    ├── SyncRefused             (sync_refused) a 4xx: the server said no, and why
    ├── EnrollError             (enroll_failed) enrollment failed (retryable when it may help)
    └── IdentityError           (identity_invalid) the identity or key files are unusable

Whatever the error, the terminal's queue is untouched: nothing is acknowledged that the
server did not answer 200 for. ``server_code`` and ``status`` carry what the server said
(``{"error": {"code", "message"}}`` and the HTTP status), when it said anything.
"""

from __future__ import annotations

from edge.errors import TillflowError
from sync.wire import ErrorBody, WireError, decode

#: What the sync runner's errors in the terminal's ``last_error`` start with (so it
#: clears only its own, and a heartbeat leaves them out: see ``SyncClient.heartbeat``).
SYNC_ERROR_PREFIX = "sync: "


class SyncError(TillflowError):
    code = "sync_error"
    #: The server's time, when it sent it (a ``clock_skew`` refusal does).
    server_time: float | None = None

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        server_code: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.server_code = server_code
        self.status = status
        if retryable is not None:
            self.retryable = retryable


class SyncUnavailable(SyncError):
    """The cloud could not be reached or answered with a server fault: try again later."""

    code = "sync_unavailable"
    retryable = True


class SyncRefused(SyncError):
    """The cloud refused the request (4xx): retrying the same request will not help."""

    code = "sync_refused"


class EnrollError(SyncError):
    code = "enroll_failed"


class IdentityError(SyncError):
    code = "identity_invalid"


def server_said(status: int, body: bytes) -> tuple[str, str]:
    """(code, message) of an error answer: its ``{"error": ...}`` body, or, for a body
    that is not one (a proxy's page), ``http_<status>`` and the start of the text."""
    try:
        err = decode(body, ErrorBody).error
    except WireError:
        text = body[:200].decode("utf-8", "replace").strip()
        return f"http_{status}", text or "(no body)"
    return err.code, err.message + (f" (field {err.field})" if err.field else "")


def server_time_of(body: bytes) -> float | None:
    """The ``server_time`` an error answer carries (``clock_skew`` does), or None."""
    try:
        return decode(body, ErrorBody).error.server_time
    except WireError:
        return None
