"""The local API for the POS app: HTTP + JSON over a Unix socket (stdlib server: small).

    POST /v1/payments          {amount_minor, currency, idempotency_key}
    POST /v1/refunds           {amount_minor, currency, idempotency_key}
    POST /v1/voids             {payment_run_id, idempotency_key}
    GET  /v1/runs/{id}
    POST /v1/runs/{id}/input   answers a WAIT (paper loaded, signature, approval)
    GET  /v1/health

Errors are ``{"error": {"code", "message", "field"?}}`` with a 4xx/5xx status. No error
message, exception or log line here ever quotes a value the POS app sent: a careless
client may put a card number in any field. What is accepted:

* **A body** is one JSON object in UTF-8, at most ``MAX_BODY_BYTES`` (413
  ``body_too_large``). Not UTF-8, not JSON, ``NaN``/``Infinity``, a key given twice, a
  number of thousands of digits or nesting past the parser's depth: 400
  ``malformed_json``; JSON but not an object: 400 ``malformed_request``.
* **Fields** strictly: exact types, no unknown field. 422 ``missing_field``,
  ``invalid_field`` or ``unknown_field``, with ``field`` naming it.

The same ``idempotency_key`` never starts a second run (the engine dedupes by key).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import InputError, InvalidRunState, NotFound, StorageFull, TillflowError
from edge.terminal.carddata import scrub
from edge.terminal.httpserver import UnixHttpServer
from edge.terminal.runtime import Terminal
from edge.terminal.views import run_view

log = logging.getLogger(__name__)

#: Largest request body accepted: a payment is a few hundred bytes. The transport caps
#: Content-Length at the same figure; the routes do not rely on sitting behind it.
MAX_BODY_BYTES = 64 * 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)


class PaymentRequest(_Request):
    amount_minor: int = Field(gt=0, le=100_000_000)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    idempotency_key: str = Field(min_length=1, max_length=128)


class RefundRequest(PaymentRequest):
    original_run_id: str | None = Field(None, min_length=1, max_length=64)


class VoidRequest(_Request):
    payment_run_id: str = Field(min_length=1, max_length=64)
    idempotency_key: str = Field(min_length=1, max_length=128)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


M = TypeVar("M", bound=BaseModel)

# Refusals below are raised outside the ``except`` that found them, so that neither
# ``__cause__`` nor ``__context__`` holds the original exception (whose text quotes the
# input): a traceback logged anywhere above shows only our own message.


class _Unacceptable(ValueError):
    """JSON we refuse although the parser would take it."""


def _no_constant(name: str) -> Any:
    raise _Unacceptable(f"{name} is not a JSON number (RFC 8259)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # which one counts differs between parsers: refuse the ambiguity
            raise _Unacceptable(f"key '{scrub(key)}' appears twice")
        out[key] = value
    return out


def _loads(raw: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why it is not acceptable JSON (never quoting the body)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not UTF-8 (invalid byte at offset {exc.start})"
    try:
        data = json.loads(
            text or "null", parse_constant=_no_constant, object_pairs_hook=_no_duplicates
        )
    except json.JSONDecodeError as exc:
        return None, f"body is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
    except _Unacceptable as exc:
        return None, f"body is not JSON this API accepts: {exc}"
    except RecursionError:
        return None, "body is not JSON this API accepts: nested too deeply"
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        return None, "body is not JSON this API accepts: a number has too many digits"
    return data, None


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as one JSON object; else ApiError 400."""
    data, problem = _loads(raw)
    if problem is not None:
        raise ApiError(400, "malformed_json", problem)
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_request", "body must be a JSON object")
    return data


def _refusal(exc: ValidationError) -> ApiError:
    """The first error of ``exc`` as a 422 naming the field, without the input. Field
    names are scrubbed too: a key may itself be a card number."""
    first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    field = scrub(".".join(str(x) for x in first["loc"])) or None
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(
        first["type"], "invalid_field"
    )
    return ApiError(422, code, f"{field or '(body)'}: {scrub(first['msg'])}", field)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as ``model``, strictly and with no unknown top-level field whatever the
    model's own config says; else ApiError 422 that does not quote the input.

    Strict as JSON is (``model_validate_json``): a date or an enum arrives as its JSON
    string, which strict Python-mode validation would refuse."""
    names = {*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)}
    unknown = next((key for key in data if key not in names), None)
    if unknown is not None:
        field = scrub(unknown)
        raise ApiError(422, "unknown_field", f"{field}: Extra inputs are not permitted", field)
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        refusal = _refusal(exc)
    raise refusal


def parse_request(raw: bytes, model: type[M]) -> M:
    """A request body as ``model``: ``json_object`` then ``validated``."""
    return validated(model, json_object(raw))


Route = tuple[str, re.Pattern[str], str]


class LocalApi:
    """The routes, free of HTTP framing: ``handle(method, path, body)`` gives the status
    and the JSON body. The transport (``edge.terminal.httpserver``) does the I/O."""

    routes: tuple[Route, ...] = (
        ("POST", re.compile(r"^/v1/payments$"), "payment"),
        ("POST", re.compile(r"^/v1/refunds$"), "refund"),
        ("POST", re.compile(r"^/v1/voids$"), "void"),
        ("GET", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})$"), "get_run"),
        ("POST", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})/input$"), "input"),
        ("GET", re.compile(r"^/v1/health$"), "health"),
    )

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request: ``path`` without its query string. Never raises for bad input."""
        try:
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
            for verb, pattern, name in self.routes:
                m = pattern.match(path)
                if m:
                    if verb != method:
                        raise ApiError(405, "method_not_allowed", f"{method} is not allowed here")
                    result: tuple[int, dict[str, Any]] = getattr(self, f"_{name}")(
                        body, **m.groupdict()
                    )
                    return result
            raise ApiError(404, "not_found", f"no route {path}")
        except ApiError as exc:
            err = {"code": exc.code, "message": exc.message}
            if exc.field:
                err["field"] = exc.field
            return exc.status, {"error": err}
        except StorageFull as exc:
            # Nothing of this request committed past the last step that fit; the same
            # idempotency key, once there is room, continues or returns the same run.
            self.terminal.last_error = f"{exc.code}: {exc.message}"
            log.warning("%s %s refused: %s", method, path, exc.message, extra={"action": exc.code})
            message = f"{exc.message}; retry with the same idempotency key once there is room"
            return 507, {"error": {"code": exc.code, "message": message}}
        except TillflowError as exc:
            self.terminal.last_error = f"{exc.code}: {exc.message}"
            status = 503 if getattr(exc, "retryable", False) else 500
            return status, {"error": {"code": exc.code, "message": exc.message}}

    def _start(self, workflow: str, req: _Request, key: str) -> tuple[int, dict[str, Any]]:
        engine = self.terminal.engine
        data = req.model_dump(exclude={"idempotency_key"}, exclude_none=True)
        try:
            run_id = engine.start(workflow, data, idempotency_key=f"pos:{workflow}:{key}")
        except InputError as exc:  # the engine's messages name fields, never values
            refusal = ApiError(422, "invalid_input", exc.message)
        else:
            # The same key answers with the run it started, whatever the body says now.
            return 200, run_view(engine.get(run_id))
        raise refusal

    def _payment(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, PaymentRequest)
        return self._start("payment", req, req.idempotency_key)

    def _refund(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, RefundRequest)
        return self._start("refund", req, req.idempotency_key)

    def _void(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, VoidRequest)
        return self._start("void", req, req.idempotency_key)

    def _get_run(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        try:
            return 200, run_view(self.terminal.engine.get(run_id))
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc

    def _input(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        data = json_object(body) if body else {}
        engine = self.terminal.engine
        try:
            engine.resume(run_id, data)
        except NotFound as exc:
            refusal = ApiError(404, "run_not_found", exc.message)
        except InvalidRunState as exc:
            refusal = ApiError(409, "not_waiting", exc.message)
        except InputError as exc:  # the engine's messages name fields, never values
            refusal = ApiError(422, "invalid_input", exc.message)
        else:
            return 200, run_view(engine.get(run_id))
        raise refusal

    def _health(self, body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, self.terminal.health()


class LocalApiServer(UnixHttpServer):
    """The local API on its Unix socket: ``LocalApiServer(path, terminal).start()``."""

    def __init__(self, path: Path, terminal: Terminal) -> None:
        self.terminal = terminal
        super().__init__(path, LocalApi(terminal).handle)
