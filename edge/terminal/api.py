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
import os
import re
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.engine import RunRecord, Status
from edge.errors import InputError, InvalidRunState, NotFound, StorageFull, TillflowError
from edge.terminal.runtime import Terminal

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


def run_view(run: RunRecord) -> dict[str, Any]:
    """What the POS app sees of a run: no card data beyond the masked PAN."""
    state = run.state
    frames = run.cursor.get("frames") or []
    view: dict[str, Any] = {
        "run_id": run.run_id,
        "workflow": run.workflow_type,
        "status": str(run.status),
        "decision": state.get("decision"),
        "reason": state.get("reason"),
        "channel": state.get("channel"),
        "auth_code": state.get("auth_code"),
        "amount_minor": state.get("amount_minor"),
        "currency": state.get("currency"),
        "masked_pan": (state.get("card") or {}).get("masked"),
    }
    if run.status is Status.WAITING and frames:
        view["waiting_for"] = frames[-1][0]
    if run.error and run.status in (Status.FAILED, Status.ROLLED_BACK):
        view["error"] = {"code": run.error.get("code"), "step": run.error.get("step")}
    return view


class _Handler(BaseHTTPRequestHandler):
    server: LocalApiServer
    protocol_version = "HTTP/1.1"
    routes: ClassVar[list[tuple[str, re.Pattern[str], str]]] = [
        ("POST", re.compile(r"^/v1/payments$"), "payment"),
        ("POST", re.compile(r"^/v1/refunds$"), "refund"),
        ("POST", re.compile(r"^/v1/voids$"), "void"),
        ("GET", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})$"), "get_run"),
        ("POST", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})/input$"), "input"),
        ("GET", re.compile(r"^/v1/health$"), "health"),
    ]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            for verb, pattern, name in self.routes:
                m = pattern.match(self.path)
                if m:
                    if verb != method:
                        raise ApiError(405, "method_not_allowed", f"{method} is not allowed here")
                    status, body = getattr(self, f"_{name}")(**m.groupdict())
                    self._send(status, body)
                    return
            raise ApiError(404, "not_found", f"no route {self.path}")
        except ApiError as exc:
            err = {"code": exc.code, "message": exc.message}
            if exc.field:
                err["field"] = exc.field
            self._send(exc.status, {"error": err})
        except StorageFull as exc:
            # Nothing of this request committed past the last step that fit; the same
            # idempotency key, once there is room, continues or returns the same run.
            self.server.terminal.last_error = f"{exc.code}: {exc.message}"
            log.warning(
                "%s %s refused: %s", method, self.path, exc.message, extra={"action": exc.code}
            )
            message = f"{exc.message}; retry with the same idempotency key once there is room"
            self._send(507, {"error": {"code": exc.code, "message": message}})
        except TillflowError as exc:
            self.server.terminal.last_error = f"{exc.code}: {exc.message}"
            status = 503 if getattr(exc, "retryable", False) else 500
            self._send(status, {"error": {"code": exc.code, "message": exc.message}})

    def _body(self, model: type[_Request]) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_request", "body must be a JSON object")
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
        engine = self.server.terminal.engine
        data = req.model_dump(exclude={"idempotency_key"}, exclude_none=True)
        # The same key answers with the run it started, whatever the body says now.
        run_id = engine.start(workflow, data, idempotency_key=f"pos:{workflow}:{key}")
        return 200, run_view(engine.get(run_id))

    def _payment(self) -> tuple[int, dict[str, Any]]:
        req = self._body(PaymentRequest)
        return self._start("payment", req, req.idempotency_key)

    def _refund(self) -> tuple[int, dict[str, Any]]:
        req = self._body(RefundRequest)
        return self._start("refund", req, req.idempotency_key)

    def _void(self) -> tuple[int, dict[str, Any]]:
        req = self._body(VoidRequest)
        return self._start("void", req, req.idempotency_key)

    def _get_run(self, run_id: str) -> tuple[int, dict[str, Any]]:
        try:
            return 200, run_view(self.server.terminal.engine.get(run_id))
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc

    def _input(self, run_id: str) -> tuple[int, dict[str, Any]]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            data = json.loads(self.rfile.read(length) or b"{}") if length else {}
        except json.JSONDecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_request", "body must be a JSON object")
        engine = self.server.terminal.engine
        try:
            engine.resume(run_id, data)
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc
        except InvalidRunState as exc:
            raise ApiError(409, "not_waiting", exc.message) from exc
        except InputError as exc:
            raise ApiError(422, "invalid_input", exc.message) from exc
        return 200, run_view(engine.get(run_id))

    def _health(self) -> tuple[int, dict[str, Any]]:
        return 200, self.server.terminal.health()

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args, extra={"action": "api_request"})


class LocalApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # Graceful stop: server_close() waits for requests in flight to finish their step.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, path: Path, terminal: Terminal) -> None:
        self.terminal = terminal
        self.socket_path = Path(path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():  # a stale socket from a crash
            self.socket_path.unlink()
        super().__init__(str(self.socket_path), _Handler)
        os.chmod(self.socket_path, 0o660)  # the POS app's user is in our group
        self._thread: threading.Thread | None = None

    def start(self) -> LocalApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="tillflow-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self.socket_path.exists():
            self.socket_path.unlink()
