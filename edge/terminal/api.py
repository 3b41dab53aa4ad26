"""The local API for the POS app: HTTP + JSON over a Unix socket (stdlib server: small).

    POST /v1/payments          {amount_minor, currency, idempotency_key}
    POST /v1/refunds           {amount_minor, currency, idempotency_key}
    POST /v1/voids             {payment_run_id, idempotency_key}
    GET  /v1/runs/{id}
    POST /v1/runs/{id}/input   answers a WAIT (paper loaded, signature, approval)
    GET  /v1/health

Errors are ``{"error": {"code", "message", "field"?}}`` with a 4xx/5xx status; the
same ``idempotency_key`` never starts a second run (the engine dedupes by key).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.errors import InputError, InvalidRunState, NotFound, StorageFull, TillflowError
from edge.terminal.httpserver import UnixHttpServer
from edge.terminal.runtime import Terminal
from edge.terminal.views import run_view

log = logging.getLogger(__name__)

#: Largest request body accepted: a payment is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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

    @staticmethod
    def _json_object(raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_request", "body must be a JSON object")
        return data

    def _parse(self, raw: bytes, model: type[_Request]) -> Any:
        data = self._json_object(raw)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(x) for x in first["loc"]) or None
            code = "missing_field" if first["type"] == "missing" else "invalid_field"
            if first["type"] == "extra_forbidden":
                code = "unknown_field"
            raise ApiError(422, code, f"{field}: {first['msg']}", field) from exc

    def _start(self, workflow: str, req: _Request, key: str) -> tuple[int, dict[str, Any]]:
        engine = self.terminal.engine
        data = req.model_dump(exclude={"idempotency_key"}, exclude_none=True)
        # The same key answers with the run it started, whatever the body says now.
        run_id = engine.start(workflow, data, idempotency_key=f"pos:{workflow}:{key}")
        return 200, run_view(engine.get(run_id))

    def _payment(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = self._parse(body, PaymentRequest)
        return self._start("payment", req, req.idempotency_key)

    def _refund(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = self._parse(body, RefundRequest)
        return self._start("refund", req, req.idempotency_key)

    def _void(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = self._parse(body, VoidRequest)
        return self._start("void", req, req.idempotency_key)

    def _get_run(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        try:
            return 200, run_view(self.terminal.engine.get(run_id))
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc

    def _input(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        data = self._json_object(body) if body else {}
        engine = self.terminal.engine
        try:
            engine.resume(run_id, data)
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc
        except InvalidRunState as exc:
            raise ApiError(409, "not_waiting", exc.message) from exc
        except InputError as exc:
            raise ApiError(422, "invalid_input", exc.message) from exc
        return 200, run_view(engine.get(run_id))

    def _health(self, body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, self.terminal.health()


class LocalApiServer(UnixHttpServer):
    """The local API on its Unix socket: ``LocalApiServer(path, terminal).start()``."""

    def __init__(self, path: Path, terminal: Terminal) -> None:
        self.terminal = terminal
        super().__init__(path, LocalApi(terminal).handle)
