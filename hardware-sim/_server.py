"""The loopback HTTP server lifecycle the HTTP simulators share.

``LoopbackServer`` binds a ``ThreadingHTTPServer`` on ``127.0.0.1``, serves it from one
daemon thread, and stops it (``stop()``, or leaving a ``with`` block). A subclass passes
its request handler class, which reaches the simulator as ``self.server.sim``, and may
override the hooks: ``_port`` (0, a free port), ``_stopped`` (true once it may not start
again) and ``_release`` (wake requests waiting on the simulator before shutdown).
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that went away mid-request (a daemon killed by the torture) is
        # expected here; anything else still prints its traceback.
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._handler_class = handler
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- hooks --------------------------------------------------------------------------

    def _port(self) -> int:
        return 0

    def _stopped(self) -> bool:
        return False

    def _release(self) -> None:
        pass

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            name = type(self).__name__
            raise RuntimeError(f"{name} is not started; call start() or use `with`")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        if self._server is not None or self._stopped():
            raise RuntimeError(f"a {type(self).__name__} starts once; make a new one")
        server = _QuietServer(("127.0.0.1", self._port()), self._handler_class)
        server.daemon_threads = True
        server.sim = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release waiting requests (``_release``), stop serving, close the socket.
        Idempotent."""
        self._release()
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
