"""The acquirer over HTTP + JSON: the real driver behind the ``Acquirer`` port.

Wire protocol (``hwsim.acquirer`` serves the same one, from the models below)::

    POST /authorize   {"pan", "expiry", "amount_minor", "currency", "terminal_id"}
    POST /refund      same body as /authorize
    POST /reverse     {"original_key"}
    header            Idempotency-Key: <key>   (required; a repeat returns the first answer)
    200               {"approved", "auth_code", "reason", "acquirer_ref"}  (a decline is a 200)
    4xx / 5xx         {"error": "<code>"}

The clear PAN travels only in the request body. It never appears in a URL, a header,
an exception message or a log line; logs carry the idempotency key instead.

httpx errors are translated here, in one place: nothing reached the acquirer
(link down, cannot connect) -> ``AcquirerUnavailable(outcome_unknown=False)``; the
request may have arrived (timeout, connection lost) -> ``outcome_unknown=True``;
an answer we cannot use -> ``AcquirerError``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from edge.errors import ConfigError
from edge.terminal.drivers._http import DIGIT_RUNS, HttpDriver, describe
from edge.terminal.drivers.contracts import (
    AcquirerError,
    AcquirerUnavailable,
    AuthRequest,
    AuthResponse,
    NetworkLink,
)

if TYPE_CHECKING:  # imported by the first call: an idle terminal has no use for httpx
    import httpx

__all__ = [
    "AUTHORIZE_PATH",
    "DEFAULT_TIMEOUT_S",
    "IDEMPOTENCY_HEADER",
    "REFUND_PATH",
    "REVERSE_PATH",
    "AuthorizeBody",
    "ErrorBody",
    "HttpAcquirer",
    "ResultBody",
    "ReverseBody",
    "decode_result",
    "encode_result",
]

logger = logging.getLogger(__name__)

#: Seconds for the whole request. Card schemes expect an answer within ~10 s end to end;
#: half of that leaves the terminal time to reverse or fall back to offline before the
#: customer gives up.
DEFAULT_TIMEOUT_S = 5.0

IDEMPOTENCY_HEADER = "Idempotency-Key"
AUTHORIZE_PATH = "/authorize"
REFUND_PATH = "/refund"
REVERSE_PATH = "/reverse"

#: Statuses that mean "try again later"; anything else the acquirer rejects stays rejected.
_RETRYABLE_STATUSES = frozenset({502, 503, 504})

# --- the wire format (I/O-free; tolerant of fields a newer peer adds) ----------------------


class _Wire(BaseModel):
    # defer_build: each body's validator is built at its first use, not at import (start).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, defer_build=True)


class AuthorizeBody(_Wire):
    """Body of /authorize and /refund. ``pan`` is a SecretStr so a repr never shows it."""

    pan: SecretStr
    expiry: str = Field(pattern=r"^\d{4}$")
    amount_minor: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    terminal_id: str = Field(min_length=1)

    @field_validator("pan")
    @classmethod
    def _pan_is_digits(cls, value: SecretStr) -> SecretStr:
        pan = value.get_secret_value()
        if not (pan.isdigit() and 12 <= len(pan) <= 19):
            raise ValueError("pan must be 12 to 19 digits")
        return value


class ReverseBody(_Wire):
    original_key: str = Field(min_length=1)


class ResultBody(_Wire):
    approved: bool
    auth_code: str | None = None
    reason: str | None = None
    acquirer_ref: str | None = None


class ErrorBody(_Wire):
    error: str


def encode_result(response: AuthResponse) -> bytes:
    body = ResultBody(
        approved=response.approved,
        auth_code=response.auth_code,
        reason=response.reason,
        acquirer_ref=response.acquirer_ref,
    )
    return body.model_dump_json().encode()


def decode_result(content: bytes, *, operation: str = "request") -> AuthResponse:
    """Parse a 200 body; AcquirerError (naming the bad fields, not their values) if it
    is not one."""
    try:
        body = ResultBody.model_validate_json(content)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "<body>" for e in exc.errors()})
        raise AcquirerError(
            f"acquirer {operation}: malformed response (bad fields: {', '.join(fields)})",
            status=200,
            hint="the acquirer broke the protocol; check its version",
        ) from None  # the pydantic error quotes the body; keep it out of tracebacks
    return AuthResponse(
        approved=body.approved,
        auth_code=body.auth_code,
        reason=body.reason,
        acquirer_ref=body.acquirer_ref,
    )


def _auth_body(req: AuthRequest) -> bytes:
    return json.dumps(
        {
            "pan": req.pan.reveal(),
            "expiry": req.expiry,
            "amount_minor": req.amount_minor,
            "currency": req.currency,
            "terminal_id": req.terminal_id,
        }
    ).encode()


def _error_code(response: httpx.Response) -> str:
    """The server's ``error`` code, scrubbed of anything that could be a PAN."""
    try:
        code = ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        code = response.reason_phrase or "no error code"
    return DIGIT_RUNS.sub("<redacted>", code)[:80]


# --- the driver ------------------------------------------------------------------------------


class HttpAcquirer(HttpDriver):
    """``Acquirer`` over HTTP. Pass ``client`` to share a connection pool or to inject
    an ``httpx.MockTransport``; otherwise one is created (ignoring proxy environment
    variables) and closed by ``close()``. ``link``, if given, is asked first: when it
    says down, no request is sent."""

    def __init__(
        self,
        base_url: str,
        client: httpx.Client | None = None,
        link: NetworkLink | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"acquirer timeout must be positive, got {timeout_s}")
        url = self._connect("acquirer", base_url, client)
        self._base = url.rstrip("/")
        self._timeout_s = timeout_s
        self._link = link

    # --- Acquirer -------------------------------------------------------------------------

    def authorize(self, req: AuthRequest) -> AuthResponse:
        return self._post("authorize", AUTHORIZE_PATH, req.idempotency_key, _auth_body(req))

    def refund(self, req: AuthRequest) -> AuthResponse:
        return self._post("refund", REFUND_PATH, req.idempotency_key, _auth_body(req))

    def reverse(self, original_key: str, idempotency_key: str) -> AuthResponse:
        body = ReverseBody(original_key=original_key).model_dump_json().encode()
        return self._post("reverse", REVERSE_PATH, idempotency_key, body)

    # --- the one place httpx is called and its errors translated ---------------------------

    def _post(self, operation: str, path: str, key: str, content: bytes) -> AuthResponse:
        if not key:
            raise ValueError("an acquirer call needs a non-empty idempotency key")
        import httpx

        if self._link is not None and not self._link.is_up():
            raise AcquirerUnavailable(
                f"acquirer {operation} not sent: the network link is down", outcome_unknown=False
            )
        url = self._base + path
        headers = {IDEMPOTENCY_HEADER: key, "Content-Type": "application/json"}
        try:
            response = self._client.post(
                url, content=content, headers=headers, timeout=httpx.Timeout(self._timeout_s)
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise AcquirerUnavailable(
                f"acquirer {operation} not sent: cannot connect to {self._base} ({describe(exc)})",
                outcome_unknown=False,
            ) from exc
        except httpx.TimeoutException as exc:
            raise AcquirerUnavailable(
                f"acquirer {operation} got no answer within {self._timeout_s:g}s; outcome unknown",
                outcome_unknown=True,
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise AcquirerUnavailable(
                f"acquirer {operation}: connection lost ({describe(exc)}); outcome unknown",
                outcome_unknown=True,
            ) from exc
        except httpx.HTTPError as exc:  # misconfiguration: protocol, proxy, redirects
            raise AcquirerError(
                f"acquirer {operation} to {self._base} failed: {describe(exc)}",
                hint="check the acquirer URL in the terminal configuration",
            ) from exc
        if response.status_code != 200:
            status = response.status_code
            raise AcquirerError(
                f"acquirer {operation} rejected with HTTP {status}: {_error_code(response)}",
                status=status,
                retryable=status in _RETRYABLE_STATUSES,
            )
        result = decode_result(response.content, operation=operation)
        logger.debug(
            "acquirer %s: approved=%s reason=%s",
            operation,
            result.approved,
            result.reason,
            extra={"action": f"acquirer.{operation}", "idempotency_key": key},
        )
        return result
