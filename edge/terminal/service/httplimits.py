"""The local API transport's limits and timeouts, each with its unit and its reason
(``edge.terminal.service.httpserver`` enforces them; ``Limits`` lets a test shrink them)."""

from __future__ import annotations

from dataclasses import dataclass

#: Largest request body accepted: a payment is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
#: Largest request line and headers being received: httpx sends about 150 bytes; 16 KiB
#: is h11's default and what common servers allow.
MAX_HEADER_BYTES = 16 * 1024
#: Open connections (idle or busy); more are answered 503 and closed. A POS app keeps a
#: few (httpx pools up to 20 idle); each costs a descriptor and a few KiB, not a thread.
MAX_CONNECTIONS = 64
#: Threads that run requests: a payment holds one for its whole inline run (a card wait
#: of up to 30 s, the authorisation), while health and run polls need others. The store
#: serialises writes on one connection, so more threads would only queue on its lock.
WORKERS = 4
#: Connections waiting for accept(): a POS opening a burst (at start, after a restart)
#: must not be refused (with 5, 17 of 30 back-to-back connects were). The kernel caps it
#: at net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 128
#: Seconds from a request's first byte to the end of its headers: a POS writes a request
#: in one go on a local socket; one that takes longer is stuck (or a slowloris).
HEADER_TIMEOUT_S = 10.0
#: Seconds from the end of the headers to the end of the body (64 KiB at most, local).
BODY_TIMEOUT_S = 10.0
#: Seconds an idle keep-alive connection is kept: longer than httpx's pool expiry (5 s),
#: so the client, not the server, closes a connection it might reuse, and short enough
#: that connections a POS leaks free their slots.
IDLE_TIMEOUT_S = 60.0
#: Seconds to write one answer (a few KiB into a local socket's buffer): a POS that stops
#: reading must not hold a worker.
WRITE_TIMEOUT_S = 10.0
#: Seconds a connection is kept after an answer that closes it, reading and discarding
#: what the client still sends, so that it reads the answer rather than failing its
#: write with EPIPE.
LINGER_S = 2.0
#: Seconds ``stop()`` gives requests in flight: an authorisation in flight (the acquirer's
#: default timeout is 10 s) and its commit; half of the unit's TimeoutStopSec=30, the rest
#: is for the WAL checkpoint and exit. A request cut off resumes from its last committed
#: step on restart, and the POS retries it with the same idempotency key.
STOP_GRACE_S = 15.0
#: Seconds ``stop()`` waits, past the grace, for the threads to notice and end.
JOIN_MARGIN_S = 2.0
#: Bytes read from a socket at once.
READ_CHUNK_BYTES = 64 * 1024
#: Seconds accept() pauses after running out of descriptors (the connects wait in the
#: backlog), rather than spinning on a listener that stays readable.
ACCEPT_BACKOFF_S = 0.5
#: Seconds between two warnings about connections refused with 503 (the rest are counted).
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Limits:
    """The server's limits and timeouts: the module's constants unless told otherwise."""

    max_connections: int = MAX_CONNECTIONS
    workers: int = WORKERS
    backlog: int = LISTEN_BACKLOG
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    write_timeout_s: float = WRITE_TIMEOUT_S
    linger_s: float = LINGER_S
    stop_grace_s: float = STOP_GRACE_S
