"""The acquirer as the control plane asks it: one question, "what became of the
operation under this key?" (``AcquirerLookup.lookup``).

``HttpAcquirerLookup`` asks hwsim's acquirer (``GET /lookup``, the key in the
``Idempotency-Key`` header, answered from its ledger); a real acquirer's status API is
another implementation of the same port. Errors::

    LookupFailed             (cloud.outcomes.acquirer; edge.errors.TillflowError)
    ├── AcquirerUnreachable  retryable: no connection, a timeout, a 5xx, a 429
    └── LookupRefused        not retryable: the acquirer refused the question (4xx) or
                             answered something that is not a lookup

A step that gets ``AcquirerUnreachable`` raises a retryable ``StepError``: the engine's
retries and backoff wait for the acquirer, durably.
"""

from __future__ import annotations

from types import TracebackType
from typing import Literal, Protocol, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import TillflowError

#: hwsim's status API (``hardware-sim/acquirer.py``'s ``LOOKUP_PATH``; hwsim is not
#: imported here: the cloud reaches it only over HTTP).
LOOKUP_PATH = "/lookup"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Seconds to wait for an answer: a lookup changes nothing, so giving up is harmless.
DEFAULT_TIMEOUT_S = 10.0

Status = Literal["approved", "declined", "reversed", "not_found"]


class LookupFailed(TillflowError):
    """The acquirer gave no usable answer."""

    code = "lookup_failed"
    retryable = False


class AcquirerUnreachable(LookupFailed):
    """No answer now (the acquirer is away or overloaded): ask again later."""

    code = "acquirer_unreachable"
    retryable = True


class LookupRefused(LookupFailed):
    """The acquirer refused the question, or its answer is not a lookup."""

    code = "lookup_refused"


class Lookup(BaseModel):
    """What the acquirer holds under a key. ``found`` false: it never saw the key
    (``status`` is ``not_found``; ``fenced``: a reversal under it came first, so a
    late request would be declined)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    found: bool
    operation: Literal["authorize", "refund", "reverse"] | None = None
    status: Status = "not_found"
    amount_minor: int | None = Field(None, ge=0)
    currency: str | None = None
    acquirer_ref: str | None = None
    reason: str | None = None
    reversed_by: str | None = None
    fenced: bool = False


class AcquirerLookup(Protocol):
    """The port: the truth about the operation under ``key``."""

    def lookup(self, key: str) -> Lookup: ...


class HttpAcquirerLookup:
    """``AcquirerLookup`` over HTTP for hwsim's acquirer (one pooled client)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    def lookup(self, key: str) -> Lookup:
        try:
            resp = self._client.get(LOOKUP_PATH, headers={IDEMPOTENCY_HEADER: key})
        except httpx.TransportError as exc:  # no connection, a timeout, a cut reply
            raise AcquirerUnreachable(
                f"acquirer {self.base_url} unreachable: {type(exc).__name__}",
                hint="the lookup is asked again with backoff",
            ) from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise AcquirerUnreachable(f"acquirer {self.base_url} answered {resp.status_code}")
        if resp.status_code != 200:
            raise LookupRefused(
                f"acquirer {self.base_url} refused the lookup: {resp.status_code} {resp.text[:200]}"
            )
        try:
            found = Lookup.model_validate_json(resp.content)
        except ValidationError as exc:
            raise LookupRefused(f"acquirer {self.base_url}: not a lookup answer") from exc
        if found.key != key:
            raise LookupRefused(f"acquirer {self.base_url} answered for another key")
        return found

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
