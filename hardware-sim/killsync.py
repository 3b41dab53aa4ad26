"""The kill -9 torture's cloud and sync client: the daemon's outbox is uploaded and
acknowledged, so the acknowledgement is killed like everything else.

An acknowledgement goes through ``Terminal.acknowledge`` (the one way acks happen): the
messages the cloud holds are dropped and the offline exposure of the offline approvals
among them is released, in one transaction. The torture kills the daemon around it and
checks that exposure was released exactly once per acknowledged offline approval.

* ``SimCloud`` (loopback HTTP, in the torture's process): ``POST /v1/outbox`` with a
  page of messages keeps them by message id and answers ``{"through": seq}``, the last
  seq it now holds. ``on_answer`` is called once the answer is sent: the torture's
  ``ack`` trigger kills the daemon from there, a few milliseconds later, so the kill
  lands before, inside or after the daemon's acknowledgement.
* ``CloudSync`` (in the daemon's process): one turn of the daemon's loop uploads the
  outbox, page by page, and acknowledges what the cloud answered it holds.
* ``python -m hwsim.killsync --config edge.yaml --cloud URL``: the terminal daemon
  (``edge.terminal.service.daemon.Daemon``, as ``edge run`` starts it) with
  ``CloudSync`` as a turn of its loop: the torture's own small cloud, in its process,
  so it can time a kill to land around one acknowledgement. The real protocol (signed,
  gzip'd, per-entry answers; ``sync.device``) is proved under kills and network faults
  against the real server in ``tests/integration/test_sync_faults.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
from hwsim._server import LoopbackServer
from hwsim.invariants import Message

from edge.terminal.service.terminal import Terminal

__all__ = ["CloudSync", "SimCloud", "main"]

log = logging.getLogger(__name__)

#: Messages uploaded per request.
PAGE = 200
#: How long the daemon waits for the cloud, in seconds: the cloud is local, so only a
#: torture that stopped it is slower.
TIMEOUT_S = 5.0


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        cloud: SimCloud = self.server.sim
        if self.path != "/v1/outbox":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        through = cloud.receive(body["messages"])
        raw = json.dumps({"through": through}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()
        cloud.on_answer()


class SimCloud(LoopbackServer):
    """The messages the cloud received, by message id (``messages()``, a copy)."""

    def __init__(self, on_answer: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, Message] = {}
        self.uploads = 0
        self.conflicts: list[str] = []  # a message id received again with other content
        self.on_answer: Callable[[], None] = on_answer or (lambda: None)
        super().__init__(_Handler)

    def receive(self, page: list[dict[str, Any]]) -> int:
        """Keep ``page``; the last seq held."""
        with self._lock:
            self.uploads += 1
            through = 0
            for m in page:
                msg = Message(
                    str(m["message_id"]), m["run_id"], str(m["topic"]), m["payload"], int(m["seq"])
                )
                earlier = self._messages.setdefault(msg.message_id, msg)
                if earlier.payload != msg.payload:
                    self.conflicts.append(f"message {msg.message_id} received changed")
                through = max(through, msg.seq)
            return through

    def messages(self) -> dict[str, Message]:
        with self._lock:
            return dict(self._messages)


class CloudSync:
    """A turn of the daemon's loop: upload the outbox to ``url``, then acknowledge what
    the cloud holds (``Terminal.acknowledge``)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT_S, trust_env=False)

    def __call__(self, terminal: Terminal) -> None:
        after = through = 0
        while True:
            page = terminal.store.outbox(after_seq=after, limit=PAGE)
            if not page:
                break
            body = {
                "messages": [
                    {
                        "message_id": m.message_id,
                        "run_id": m.run_id,
                        "topic": m.topic,
                        "payload": m.payload,
                        "seq": m.seq,
                    }
                    for m in page
                ]
            }
            try:
                answer = self.http.post("/v1/outbox", json=body)
                answer.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("upload failed: %s", exc, extra={"action": "sync"})
                break
            through = int(answer.json()["through"])
            after = page[-1].seq or after
            if len(page) < PAGE:
                break
        if through:
            terminal.acknowledge(through)

    def close(self) -> None:
        self.http.close()


def main(argv: list[str] | None = None) -> int:
    from edge.terminal.service.daemon import Daemon

    parser = argparse.ArgumentParser(
        prog="python -m hwsim.killsync",
        description="the terminal daemon, its outbox uploaded to and acknowledged by a cloud",
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cloud", required=True, help="the SimCloud's URL")
    args = parser.parse_args(argv)
    sync = CloudSync(args.cloud)
    try:
        return Daemon(args.config, turns={"sync": sync}).run()
    finally:
        sync.close()


if __name__ == "__main__":
    raise SystemExit(main())
