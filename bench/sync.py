"""Sync ingest through the real HTTP endpoint into PostgreSQL, against a raw bulk insert
of the same rows in the same run (the baseline), and a terminal's drain.

    python bench/sync.py [--quick] [--rows N] [--batch N] [--devices N] [--drain N]
                         [--exchange N] [--rounds N] [--only exchange]

Legs:

* ``audit_http_<W>w``: ``--devices`` enrolled devices, each a thread posting signed,
  gzip'd ``POST /v1/sync`` batches of ``--batch`` audit rows (a valid version 2 chain, so
  the server verifies every hash) to ``tillflow cloud serve --workers W`` (one leg per
  ``--workers`` value: 1, and 2 for the two cores) until ``--rows`` rows are in. Rows/s
  counts rows the server answered for.
* ``outbox_http``: the same with outbox entries (payment-like payloads).
* ``audit_raw`` / ``outbox_raw``: the same rows ``COPY``'d by psycopg into a table of the
  same shape (``device_audit`` / ``sync_messages``' columns) in a scratch table: what
  PostgreSQL itself takes on this machine. ``<kind>_ratio_<W>w`` = http / raw.
* ``drain``: a terminal database (``SqliteStore``) holding ``--drain`` unsent outbox
  messages and their audit rows, drained to zero by the device's ``SyncClient``
  (``sync.device``) against the same server: seconds, and the device-side CPU (this
  process's CPU time while draining, the server being another process) per message.

* ``exchange``: ``--exchange`` terminals (a ``SqliteStore`` each, the real ``SyncClient``
  and one shared keep-alive ``httpx.Client``, as the fleet simulator runs them), each
  syncing ``--rounds`` times one after another, a payment message and its audit row
  queued before every other round: CPU milliseconds per sync on the device side (this
  process) and the serve side (the ``serve`` process, 1 worker, from /proc). Baseline,
  in the same run on the same client and server: ``GET /v1/health`` (one request, one
  small database transaction); ``*_ratio`` = sync / health, the figure to compare
  across runs and machines. ``wall_ms_per_sync`` is one sync's latency (nothing else
  in flight).

Batches are built before a leg's clock starts (the device-side cost of building them is
in ``drain``). Needs PostgreSQL (``TILLFLOW_TEST_DATABASE_URL`` or the local ``test``
database's server); makes a scratch database and drops it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Run as ``python bench/sync.py``, this file's folder comes first on sys.path and this
# module would stand in for the ``sync`` package: put the repository there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from edge.engine.audit import GENESIS, link  # noqa: E402
from edge.engine.records import AuditEvent  # noqa: E402
from sync import signing, wire  # noqa: E402

PG_URL = os.environ.get("TILLFLOW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SERVE_TIMEOUT_S = 60.0


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"tillflow_bench_sync_{os.getpid()}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_URL, name)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _cli(*args: str, db: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "cloud", *args, "--database-url", db],
        capture_output=True,
        text=True,
        check=True,
        timeout=SERVE_TIMEOUT_S,
    )
    return out.stdout


#: The pid of each ``cloud_server``'s serve process, by its URL (the exchange leg reads
#: its CPU time).
SERVE_PIDS: dict[str, int] = {}


@contextlib.contextmanager
def cloud_server(db: str, work: Path, workers: int = 1) -> Iterator[str]:
    """``tillflow cloud serve`` on a free port; yields its base URL (its pid in
    ``SERVE_PIDS``)."""
    cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve", "--database-url", db]
    cmd += ["--port", "0", "--signing-key", str(work / "cp.key"), "--workers", str(workers)]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith("listening on "):
                url = line.split()[-1].strip()
        if url is None:
            raise SystemExit(f"cloud serve did not start: {(work / 'serve.log').read_text()}")
        SERVE_PIDS[url] = proc.pid
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class Device:
    """An enrolled device posting hand-built batches (the wire protocol, no terminal)."""

    def __init__(self, url: str, db: str, store: str) -> None:
        token = json.loads(_cli("enroll-token", "create", "--store", store, "--json", db=db))
        self.key = signing.new_key()
        req = wire.EnrollRequest(
            protocol_version=wire.PROTOCOL_VERSION,
            token=token["token"],
            public_key=signing.public_text(self.key),
            binary_version="bench",
        )
        r = httpx.post(f"{url}/v1/enroll", content=wire.encode(req), timeout=30)
        r.raise_for_status()
        self.device_id = wire.decode(r.content, wire.EnrollResponse).device_id
        self.stream = uuid.uuid4().hex
        self.url = url
        self.audit_head: tuple[int, str] = (0, GENESIS)
        self.outbox_seq = 0

    def heartbeat(self) -> wire.Heartbeat:
        return wire.Heartbeat(
            at=time.time(),
            binary_version="bench",
            storage_state="ok",
            storage_used_percent=1.0,
            outbox_depth=0,
            offline_exposure_minor=0,
            offline_count=0,
        )

    def audit_batch(self, n: int) -> bytes:
        rows = []
        seq, prev = self.audit_head
        for _ in range(n):
            seq += 1
            ev = AuditEvent(
                f"run-{seq // 8}", "step_completed", 1.7e9 + seq, "charge", {"amount_minor": seq}
            )
            h = link(prev, seq, ev)
            rows.append(
                wire.AuditEntry(
                    seq=seq,
                    run_id=ev.run_id,
                    event=ev.event,
                    step=ev.step,
                    detail=ev.detail,
                    at=ev.at,
                    prev_hash=prev,
                    hash=h,
                )
            )
            prev = h
        self.audit_head = (seq, prev)
        return self._body(audit=rows)

    def outbox_batch(self, n: int) -> bytes:
        entries = []
        for _ in range(n):
            self.outbox_seq += 1
            s = self.outbox_seq
            payload = {
                "run_id": f"run-{s}",
                "amount_minor": 1000 + s,
                "currency": "EUR",
                "decision": "approved",
                "offline": s % 3 == 0,
                "pan_masked": "411111******1111",
            }
            mid, at = f"msg-{self.stream[:8]}-{s}", 1.7e9 + s
            ch = wire.content_hash(mid, "payment", payload, at, f"run-{s}", "charge")
            entries.append(
                wire.OutboxEntry(
                    seq=s,
                    message_id=mid,
                    run_id=f"run-{s}",
                    step="charge",
                    topic="payment",
                    payload=payload,
                    created_at=at,
                    content_hash=ch,
                )
            )
        return self._body(outbox=entries)

    def _body(self, **parts: Any) -> bytes:
        req = wire.SyncRequest(
            protocol_version=wire.PROTOCOL_VERSION,
            device_id=self.device_id,
            stream=self.stream,
            sent_at=time.time(),
            heartbeat=self.heartbeat(),
            **parts,
        )
        return gzip.compress(wire.encode(req), compresslevel=1)

    def post(self, http: httpx.Client, body: bytes) -> wire.SyncResponse:
        headers = signing.sign_request(
            self.key, "POST", "/v1/sync", body, self.device_id, time.time()
        )
        headers["content-encoding"] = "gzip"
        headers["content-type"] = "application/json"
        r = http.post(f"{self.url}/v1/sync", content=body, headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"sync answered {r.status_code}: {r.text[:300]}")
        return wire.decode(r.content, wire.SyncResponse)


def http_leg(devices: list[Device], rows: int, batch: int, kind: str) -> dict[str, Any]:
    per_device = rows // len(devices) // batch
    bodies = {
        d.device_id: [
            (d.audit_batch(batch) if kind == "audit" else d.outbox_batch(batch))
            for _ in range(per_device)
        ]
        for d in devices
    }
    taken = [0] * len(devices)

    def work(i: int, d: Device) -> None:
        with httpx.Client(timeout=60) as http:
            for body in bodies[d.device_id]:
                resp = d.post(http, body)
                through = resp.audit_through if kind == "audit" else resp.outbox_through
                assert through is not None, resp
                taken[i] += batch

    threads = [threading.Thread(target=work, args=(i, d)) for i, d in enumerate(devices)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    n = sum(taken)
    return {"rows": n, "seconds": round(elapsed, 3), "rows_per_s": round(n / elapsed)}


def raw_leg(db: str, rows: int, kind: str) -> dict[str, Any]:
    """The same number of rows COPY'd into a same-shaped scratch table."""
    d = "bench_raw_audit" if kind == "audit" else "bench_raw_outbox"
    with psycopg.connect(db, autocommit=True) as conn:
        if kind == "audit":
            conn.execute(
                f"CREATE TABLE {d} (device_id text, stream text, chain int, seq bigint, "
                "run_id text, event text, step text, detail jsonb, at double precision, "
                "prev_hash text, hash text, version int, "
                "PRIMARY KEY (device_id, stream, chain, seq))"
            )
        else:
            conn.execute(
                f"CREATE TABLE {d} (device_id text, stream text, seq bigint, message_id text, "
                "topic text, payload jsonb, content_hash text, received_at double precision, "
                "PRIMARY KEY (device_id, stream, seq))"
            )
        buf = io.StringIO()
        for s in range(1, rows + 1):
            if kind == "audit":
                detail = json.dumps({"amount_minor": s})
                buf.write(
                    f"dev\tst\t0\t{s}\trun-{s // 8}\tstep_completed\tcharge\t{detail}\t"
                    f"{1.7e9 + s}\t{'0' * 64}\t{'1' * 64}\t2\n"
                )
            else:
                payload = json.dumps({"run_id": f"run-{s}", "amount_minor": 1000 + s})
                buf.write(f"dev\tst\t{s}\tmsg-{s}\tpayment\t{payload}\t{'2' * 64}\t{time.time()}\n")
        data = buf.getvalue()
        t0 = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY {d} FROM STDIN") as cp:
            cp.write(data)
        elapsed = time.perf_counter() - t0
        conn.execute(f"DROP TABLE {d}")
    return {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": round(rows / elapsed)}


class _Hooks:
    """The terminal as the sync client sees it, for a bare store (no payments run)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.last_error: str | None = None

    def health(self) -> dict[str, Any]:
        stats = self.store.outbox_stats()
        return {"outbox_depth": stats.depth, "offline_exposure_minor": 0, "offline_count": 0}

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        from edge.terminal.service.terminal import offline_acknowledgement

        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return int(self.store.acknowledge(ack).messages)

    def refresh_documents(self) -> None:
        pass

    def active_policy_version(self) -> int | None:
        return None


def fill(store: Any, messages: int) -> None:
    """``messages`` payment messages and one audit row each, written by the store's own
    writer (``record_command`` with no ledger row: audit and outbox only), 500 a
    transaction."""
    from edge.engine.records import CommandRecord, OutboxMessage

    done = 0
    while done < messages:
        n = min(500, messages - done)
        outbox, audit = [], []
        for i in range(done, done + n):
            at = 1.7e9 + i
            payload = {
                "run_id": f"run-{i}",
                "amount_minor": 100 + i % 900,
                "currency": "EUR",
                "decision": "approved",
                "channel": "online",
                "masked_pan": "411111******1111",
            }
            outbox.append(OutboxMessage(f"m-{i}", f"run-{i}", "record", "payment", payload, at))
            audit.append(AuditEvent(f"run-{i}", "step_completed", at, "record", {"n": i}))
        store.record_command(
            CommandRecord(
                seq=None,
                command_id=f"fill-{done}",
                action="fill",
                status="applied",
                reason=None,
                issued_at=0.0,
                at=1.7e9,
                document=None,
                audit=audit,
                outbox=outbox,
            )
        )
        done += n


def drain_leg(url: str, db: str, messages: int, work: Path) -> dict[str, Any]:
    """A terminal database with ``messages`` unsent outbox messages (and as many audit
    rows), drained to zero by the device's ``SyncClient``, one request after another."""
    from edge.engine import SystemClock
    from edge.store.sqlite import SqliteStore
    from sync.device.client import SyncClient
    from sync.device.identity import enroll, load_key

    data = work / "drain"
    data.mkdir(mode=0o700)
    store = SqliteStore(data / "terminal.db")
    try:
        fill(store, messages)
        token = json.loads(_cli("enroll-token", "create", "--store", "drain", "--json", db=db))
        identity = enroll(url, token["token"], data, "bench")
        client = SyncClient(
            identity,
            load_key(data),
            store,
            _Hooks(store),
            SystemClock(),
            binary_version="bench",
            max_entries=wire.MAX_BATCH_ENTRIES,
        )
        requests = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        while store.outbox_stats().depth or client.build().request.audit:
            client.sync_once()
            requests += 1
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        client.close()
    finally:
        store.close()
    return {
        "messages": messages,
        "requests": requests,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(messages / elapsed),
        "device_cpu_us_per_message": round(cpu / messages * 1e6, 1),
    }


def process_cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange_leg(url: str, db: str, terminals: int, rounds: int, work: Path) -> dict[str, Any]:
    """What one sync costs each side, against one health request (module docstring)."""
    from cloud.sync.postgres import PostgresSyncBackend
    from edge.engine import SystemClock
    from edge.store.sqlite import SqliteStore
    from sync.device.client import SyncClient
    from sync.device.identity import enroll, load_key
    from sync.server import SyncService

    serve = SERVE_PIDS[url]
    backend = PostgresSyncBackend(db, migrate=False, pool_size=1)
    tokens = SyncService(backend, SystemClock(), None)
    http = httpx.Client(timeout=30, trust_env=False)
    stores, clients = [], []
    try:
        for i in range(terminals):
            data = work / f"exchange-{i}"
            data.mkdir(mode=0o700)
            store = SqliteStore(data / "terminal.db", synchronous="NORMAL")
            stores.append(store)
            token = tokens.create_enroll_token(f"store-{i % 4}").token
            identity = enroll(url, token, data, "bench", http)
            key = load_key(data)
            hooks = _Hooks(store)
            clients.append(
                SyncClient(identity, key, store, hooks, SystemClock(), http, binary_version="bench")
            )
        for c in clients:  # warm: connections open, statements cached, queries prepared
            c.sync_once()
        queued = syncs = 0
        client_s = serve_s = wall_s = 0.0
        for r in range(rounds):
            if r % 2 == 0:  # a payment message and its audit row, as a sale leaves
                for store in stores:
                    _one_payment(store, queued)
                queued += 1
            c0, s0, w0 = time.process_time(), process_cpu_s(serve), time.perf_counter()
            for c in clients:
                c.sync_once()
            wall_s += time.perf_counter() - w0
            client_s += time.process_time() - c0
            serve_s += process_cpu_s(serve) - s0
            syncs += len(clients)
        left = sum(s.outbox_stats().depth for s in stores)
        n_health = syncs
        c0, s0, w0 = time.process_time(), process_cpu_s(serve), time.perf_counter()
        for _ in range(n_health):
            http.get(f"{url}/v1/health").raise_for_status()
        health_wall = time.perf_counter() - w0
        health_client = time.process_time() - c0
        health_serve = process_cpu_s(serve) - s0
    finally:
        for c in clients:
            c.close()
        for store in stores:
            store.close()
        http.close()
        backend.close()
    per = lambda total, n: round(1000 * total / n, 3)  # noqa: E731
    return {
        "terminals": terminals,
        "syncs": syncs,
        "outbox_left": left,
        "client_cpu_ms_per_sync": per(client_s, syncs),
        "serve_cpu_ms_per_sync": per(serve_s, syncs),
        "wall_ms_per_sync": per(wall_s, syncs),
        "health_client_cpu_ms": per(health_client, n_health),
        "health_serve_cpu_ms": per(health_serve, n_health),
        "health_wall_ms": per(health_wall, n_health),
        "client_cpu_ratio": round(client_s / health_client, 2) if health_client else None,
        "serve_cpu_ratio": round(serve_s / health_serve, 2) if health_serve else None,
    }


def _one_payment(store: Any, n: int) -> None:
    """One payment's outbox message and audit row, as ``fill`` writes them."""
    from edge.engine.records import CommandRecord, OutboxMessage

    at = time.time()
    payload = {
        "run_id": f"pay-{n}",
        "amount_minor": 100 + n,
        "currency": "EUR",
        "decision": "approved",
        "channel": "online",
        "masked_pan": "411111******1111",
    }
    store.record_command(
        CommandRecord(
            seq=None, command_id=f"pay-{n}", action="fill", status="applied", reason=None,
            issued_at=0.0, at=at, document=None,
            audit=[AuditEvent(f"pay-{n}", "step_completed", at, "record", {"n": n})],
            outbox=[OutboxMessage(f"p-{n}", f"pay-{n}", "record", "payment", payload, at)],
        )
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows per HTTP leg")
    parser.add_argument("--batch", type=int, default=2000, help="entries per request")
    parser.add_argument("--devices", type=int, default=4, help="devices posting at once")
    parser.add_argument("--drain", type=int, default=10_000, help="messages in the drain leg")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="uvicorn workers, one leg each"
    )
    parser.add_argument("--exchange", type=int, default=50, help="terminals in the exchange leg")
    parser.add_argument("--rounds", type=int, default=20, help="syncs per terminal there")
    parser.add_argument("--only", choices=["exchange"], help="run that leg alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.drain, args.exchange, args.rounds = 20_000, 1_000, 20, 10
    out: dict[str, Any] = {"benchmark": "sync", "batch": args.batch, "devices": args.devices}
    with tempfile.TemporaryDirectory() as tmp, scratch_database() as db:
        work = Path(tmp)
        with cloud_server(db, work, 1) as url:
            print(f"exchange: {args.exchange} terminals x {args.rounds} syncs...", file=sys.stderr)
            out["exchange"] = exchange_leg(url, db, args.exchange, args.rounds, work)
        if args.only == "exchange":
            print(json.dumps(out, indent=2))
            return 0
        for workers in args.workers:
            with cloud_server(db, work, workers) as url:
                for kind in ("audit", "outbox"):
                    devices = [Device(url, db, f"store-{i}") for i in range(args.devices)]
                    print(
                        f"{kind}: {args.rows} rows over HTTP, {workers} worker(s)...",
                        file=sys.stderr,
                    )
                    out[f"{kind}_http_{workers}w"] = http_leg(devices, args.rows, args.batch, kind)
                if workers == args.workers[0]:
                    print(f"drain: {args.drain} messages...", file=sys.stderr)
                    out["drain"] = drain_leg(url, db, args.drain, work)
        for kind in ("audit", "outbox"):
            rows = out[f"{kind}_http_{args.workers[0]}w"]["rows"]
            print(f"{kind}: the same rows by COPY...", file=sys.stderr)
            raw = out[f"{kind}_raw"] = raw_leg(db, rows, kind)
            for workers in args.workers:
                http = out[f"{kind}_http_{workers}w"]
                out[f"{kind}_ratio_{workers}w"] = round(http["rows_per_s"] / raw["rows_per_s"], 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
