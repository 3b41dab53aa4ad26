"""The local API's HTTP transport over a Unix socket: framing only, the routes are a
callable ``app(method, path, body) -> (status, json_body)`` (``edge.terminal.api``)."""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Largest request body accepted: a payment is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024

App = Callable[[str, str, bytes], tuple[int, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: UnixHttpServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            message = f"request body over {MAX_BODY_BYTES} bytes"
            self._send(413, {"error": {"code": "body_too_large", "message": message}})
            return
        raw = self.rfile.read(length) if length else b""
        status, body = self.server.app(method, self.path, raw)
        self._send(status, body)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args, extra={"action": "api_request"})


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # Graceful stop: server_close() waits for requests in flight to finish their step.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, path: Path, app: App) -> None:
        self.app = app
        self.socket_path = Path(path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():  # a stale socket from a crash
            self.socket_path.unlink()
        super().__init__(str(self.socket_path), _Handler)
        os.chmod(self.socket_path, 0o660)  # the POS app's user is in our group
        self._thread: threading.Thread | None = None

    def start(self) -> UnixHttpServer:
        self._thread = threading.Thread(target=self.serve_forever, name="tillflow-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self.socket_path.exists():
            self.socket_path.unlink()
