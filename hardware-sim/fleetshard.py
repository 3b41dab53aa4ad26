"""One process's share of the fleet simulation (``hwsim.fleetsim`` runs about one per
core): the terminals whose plan index ``i`` has ``i % shards == shard``, each a real
terminal (``hwsim.simfleet.SimTerminal``: its own SQLite database, the real payment
workflows and sync client), driven by the coordinator over a pipe.

The coordinator calls ``Shard`` methods by name (``serve``: a ``(method, kwargs)``
message in, ``("ok", result)`` or ``("error", traceback)`` out); every shard gets the
same call at once, so the fleet moves in step. Who a terminal is and what happens to it
is drawn from the seed and its index, never from the order things ran in:

* ``FleetPlan``: the hardware models (one, ``XR-7``, jams its printer under a floor
  limit above ``XR7_JAMS_ABOVE``), which terminals enroll late, which lose their link
  for the rest of the day at ``long_offline_hour`` (offline for hours), which have flaky
  links (down an hour now and then), which stores lose their network for an outage;
* ``hour(h)``: one hour of trading in virtual time: the links as the plan says for hour
  ``h``, then each terminal's payments (online, or offline within its risk limits when
  its link is down), with refunds and voids of some; ``settle()`` the end of the day;
* ``round()``: one sync interval: every enrolled terminal whose link is up syncs once
  (its due retries first, as the daemon's loop runs them).

CPU per terminal is the thread CPU time (``time.thread_time``) its own calls took.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwsim.cloudrig import FleetApi
from hwsim.simfleet import (
    FleetSpec,
    HardwareModel,
    SimFleet,
    SimTerminal,
    TerminalSpec,
    rss_mib,
)

#: Exchanges a terminal may make in one round when its sync client asks for another at
#: once (a cut batch, command results to send).
MORE_PER_ROUND = 3
#: Above this floor limit the XR-7's printer firmware jams (the config that fails).
XR7_JAMS_ABOVE = 5_000


def _floor(content: dict[str, Any]) -> int:
    return int(((content or {}).get("risk") or {}).get("floor_limit_minor") or 0)


def _xr7_fails(content: dict[str, Any]) -> bool:
    return _floor(content) > XR7_JAMS_ABOVE


MODELS = (
    HardwareModel("TF-100", weight=0.58),
    HardwareModel("TF-200", weight=0.30),
    HardwareModel("XR-7", weight=0.12, fails_config=_xr7_fails),
)


@dataclass(frozen=True)
class FleetPlan:
    """The fleet and its day, as data (sent to each shard; every draw is seeded)."""

    terminals: int
    seed: int = 1
    shards: int = 2
    hours: int = 8
    #: Payments a terminal takes in the day, on average.
    sales_per_terminal: float = 1.5
    #: Hours of the day between a terminal's syncs (and after the last hour).
    sync_every_hours: int = 4
    refund_share: float = 0.05
    void_share: float = 0.03
    late_share: float = 0.01
    #: Offline from ``long_offline_hour`` until the network heals (through every rollout:
    #: each wave holding one waits its device timeout, then counts it timed out).
    long_offline_share: float = 0.003
    long_offline_hour: int = 3
    flaky_share: float = 0.10
    flaky_down_p: float = 0.2
    outage_store_share: float = 0.05
    outage_hours: tuple[int, ...] = (4, 5)
    skewed_share: float = 0.02
    #: Threads per process: enough to hide a request's latency, few enough that they
    #: do not spend their time handing the GIL to each other.
    threads: int = 6
    sync_interval_s: float = 60.0

    @property
    def stores(self) -> int:
        return max(2, self.terminals // 25)

    def spec(self) -> FleetSpec:
        return FleetSpec(
            terminals=self.terminals, seed=self.seed, stores=self.stores, models=MODELS,
            sync_interval_s=self.sync_interval_s, threads=self.threads,
            skewed=self.skewed_share, batch_max_entries=500,
        )  # fmt: skip

    def _draw(self, what: str, index: int) -> float:
        return random.Random(f"{self.seed}:{what}:{index}").random()

    def late(self, index: int) -> bool:
        return self._draw("late", index) < self.late_share

    def long_offline(self, index: int) -> bool:
        return self._draw("long-offline", index) < self.long_offline_share

    def flaky(self, index: int) -> bool:
        return self._draw("flaky", index) < self.flaky_share

    def outage_store(self, store: str) -> bool:
        return random.Random(f"{self.seed}:outage:{store}").random() < self.outage_store_share

    def link_up(self, t: TerminalSpec, hour: int) -> bool:
        """Whether ``t``'s link is up in hour ``hour`` of the day."""
        if self.long_offline(t.index) and hour >= self.long_offline_hour:
            return False
        if hour in self.outage_hours and self.outage_store(t.store):
            return False
        if self.flaky(t.index):
            return random.Random(f"{self.seed}:flap:{t.index}:{hour}").random() >= self.flaky_down_p
        return True

    def sales(self, index: int, hour: int) -> int:
        """Payments terminal ``index`` takes in ``hour`` (three chances an hour)."""
        rng = random.Random(f"{self.seed}:sales:{index}:{hour}")
        p = min(1.0, self.sales_per_terminal / (3 * self.hours))
        return sum(rng.random() < p for _ in range(3))


class Shard:
    """The terminals of one process (see the module doc)."""

    def __init__(self, plan: dict[str, Any], shard: int, work: str, urls: list[str],
                 api_url: str, api_token: str, epoch: float) -> None:  # fmt: skip
        self.plan = FleetPlan(**{**plan, "outage_hours": tuple(plan["outage_hours"])})
        self.shard = shard
        self.work = Path(work)
        self.urls = urls
        self.api_url, self.api_token = api_url, api_token
        #: wall time (``time.time``) the scenario started: request times are kept as
        #: seconds since, comparable across processes.
        self.epoch = epoch
        self.mono0 = time.monotonic() - (time.time() - epoch)
        self.fleet: SimFleet | None = None
        self.cpu: dict[int, float] = {}
        self._cpu_lock = threading.Lock()
        self.requests: list[tuple[float, float, int]] = []
        self._req_lock = threading.Lock()
        self.last_sync: dict[int, float] = {}
        self.counts = {"payments": 0, "approved": 0, "offline": 0, "declined": 0,
                       "refunds": 0, "voids": 0, "settlements": 0}  # fmt: skip

    # --- plumbing --------------------------------------------------------------------

    def _observe(self, start: float, seconds: float, status: int) -> None:
        with self._req_lock:
            self.requests.append((round(start - self.mono0, 3), round(seconds, 4), status))

    def _timed(self, t: SimTerminal, fn: Callable[[], Any]) -> Any:
        c0 = time.thread_time()
        try:
            return fn()
        finally:
            spent = time.thread_time() - c0
            with self._cpu_lock:
                self.cpu[t.spec.index] = self.cpu.get(t.spec.index, 0.0) + spent

    def _map(self, fn: Callable[[SimTerminal], Any], ts: list[SimTerminal]) -> list[Any]:
        assert self.fleet is not None
        return list(self.fleet.pool.map(lambda t: self._timed(t, lambda: fn(t)), ts))

    @property
    def terminals(self) -> list[SimTerminal]:
        assert self.fleet is not None
        return self.fleet.terminals

    # --- the calls -------------------------------------------------------------------

    def make(self) -> dict[str, Any]:
        """Make this shard's terminals (the file-descriptor limit raised for them)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, 8 * self.plan.terminals // self.plan.shards + 1024))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        mine = range(self.shard, self.plan.terminals, self.plan.shards)
        c0, w0, r0 = time.process_time(), time.monotonic(), rss_mib()
        self.fleet = SimFleet(self.plan.spec(), self.work, self.urls, only=mine,
                              observe=self._observe)  # fmt: skip
        return {"terminals": len(self.fleet), "cpu_s": time.process_time() - c0,
                "wall_s": time.monotonic() - w0, "rss_mib": rss_mib(),
                "rss_mib_terminals": rss_mib() - r0}  # fmt: skip

    def enroll(self, late: bool = False) -> dict[str, Any]:
        """Enroll the terminals that enroll on time (``late``: the late joiners), each
        with a one-time token it is given through the Fleet API."""
        chosen = [t for t in self.terminals if self.plan.late(t.spec.index) == late]
        local = threading.local()
        clients: list[FleetApi] = []

        def one(t: SimTerminal) -> str:
            if late:
                t.up()  # a terminal joins when it is installed: on the shop's network
            api = getattr(local, "api", None)
            if api is None:
                api = local.api = FleetApi(self.api_url, self.api_token)
                clients.append(api)
            body = {"store": t.spec.store, "group": t.spec.group}
            token = str(api.post("/api/v1/enroll-tokens", body)["token"])
            return t.enroll(self.urls[t.spec.index % len(self.urls)], token)

        try:
            ids = self._map(one, chosen)
        finally:
            for c in clients:
                c.close()
        return {"enrolled": len(ids)}

    def links(self, hour: int) -> dict[str, Any]:
        """Each terminal's link as the plan says for (virtual) hour ``hour``: past the
        day's last hour the flaky ones keep flapping, the long-offline ones stay down."""
        for t in self.terminals:
            if self.plan.link_up(t.spec, hour):
                t.up()
            else:
                t.down()
        return {"down": sum(not t.online for t in self.terminals)}

    def hour(self, hour: int) -> dict[str, Any]:
        """Hour ``hour`` of the day: links as planned, then the payments (some refunded
        or voided after)."""
        self.links(hour)
        before = dict(self.counts)

        def trade(t: SimTerminal) -> None:
            for n in range(self.plan.sales(t.spec.index, hour)):
                self._sale(t, hour, n)

        self._map(trade, self.terminals)
        return {k: self.counts[k] - before[k] for k in self.counts} | {
            "down": sum(not t.online for t in self.terminals)
        }

    def _sale(self, t: SimTerminal, hour: int, n: int) -> None:
        rng = random.Random(f"{self.plan.seed}:sale:{t.spec.index}:{hour}:{n}")
        amount = rng.randrange(100, 4_000)
        key = f"s{self.plan.seed}-{t.spec.index}-{hour}-{n}"
        sale = t.sell(amount, rng.choice(("visa", "mastercard", "amex")), key)
        with self._cpu_lock:
            self.counts["payments"] += 1
            if sale.decision == "approved":
                self.counts["approved"] += 1
                if sale.channel == "offline":
                    self.counts["offline"] += 1
            else:
                self.counts["declined"] += 1
        if sale.decision != "approved":
            return
        roll = rng.random()
        if roll < self.plan.refund_share:
            body = {"amount_minor": amount, "currency": "EUR", "idempotency_key": f"r-{key}",
                    "original_run_id": sale.run_id}  # fmt: skip
            t.api.handle("POST", "/v1/refunds", json.dumps(body).encode())
            with self._cpu_lock:
                self.counts["refunds"] += 1
        elif roll < self.plan.refund_share + self.plan.void_share:
            body = {"payment_run_id": sale.run_id, "idempotency_key": f"v-{key}"}
            t.api.handle("POST", "/v1/voids", json.dumps(body).encode())
            with self._cpu_lock:
                self.counts["voids"] += 1

    def settle(self) -> dict[str, Any]:
        """The end of the day: each terminal's settlement run (one batch message)."""

        def one(t: SimTerminal) -> None:
            t.terminal.engine.start("settlement", {})

        self._map(one, self.terminals)
        self.counts["settlements"] += len(self.terminals)
        return {"settlements": len(self.terminals)}

    def round(self) -> dict[str, Any]:
        """One sync interval: every enrolled terminal whose link is up syncs once."""
        chosen = [t for t in self.terminals if t.online and t.runner is not None]
        failures = sum(t.sync_failures for t in chosen)
        syncs = sum(t.syncs for t in chosen)
        now = time.monotonic()

        def one(t: SimTerminal) -> None:
            failed = t.sync_failures
            for _ in range(MORE_PER_ROUND):  # "sync again at once", as the daemon would
                if t.sync() > 0:
                    break
            if t.sync_failures == failed:
                self.last_sync[t.spec.index] = time.monotonic()

        self._map(one, chosen)
        return {"syncs": sum(t.syncs for t in chosen) - syncs,
                "failed": sum(t.sync_failures for t in chosen) - failures,
                "wall_s": time.monotonic() - now}  # fmt: skip

    def heal(self) -> dict[str, Any]:
        for t in self.terminals:
            t.up()
        return {"up": len(self.terminals)}

    def finish(self) -> dict[str, Any]:
        """Due retries until no run is left unfinished (a jammed printer's)."""
        assert self.fleet is not None
        self.fleet.finish(timeout_s=120)
        return {}

    def pending(self) -> dict[str, Any]:
        """How many terminals still have something unsent (outbox or audit)."""
        behind = [t.name for t in self.terminals if t.runner is not None and t.pending()]
        return {"pending": len(behind), "examples": behind[:5]}

    def versions(self) -> dict[str, Any]:
        """Per terminal (device id): config and policy versions in force, failing."""
        out = {}
        for t in self.terminals:
            found = t.terminal.store.active_document("config")
            out[t.device_id or t.name] = {
                "name": t.name, "model": t.spec.model.name,
                "config": None if found is None else int(found[0]),
                "floor": None if found is None else _floor(dict(found[1])),
                "policy": t.terminal.active_policy_version(), "failing": t.failing,
                "last_error": t.terminal.last_error,
            }  # fmt: skip
        return out

    def accounts(self) -> list[dict[str, Any]]:
        """Each enrolled terminal's own account, for ``tillflow cloud reconcile``."""
        out = []
        for t in self.terminals:
            if t.device_id is None:
                continue
            store = t.terminal.store
            stats = store.outbox_stats()
            head = store.audit_head(0)
            out.append({
                "device_id": t.device_id, "name": t.name, "stream": store.database_id(),
                "payments": [s.run_id for s in t.sales], "approved": sorted(t.approved()),
                "outbox_last_seq": _outbox_written(t), "outbox_depth": stats.depth,
                "audit_head": None if head is None else [head[0], head[1]],
            })  # fmt: skip
        return out

    def distributions(self) -> dict[str, list[float]]:
        """Raw per-terminal figures: seconds since its last good sync, age of its oldest
        unsent message (0: none), syncs done, CPU ms it cost."""
        now = time.monotonic()
        lag, age, syncs, cpu = [], [], [], []
        wall = time.time()
        for t in self.terminals:
            if t.runner is None:
                continue
            last = self.last_sync.get(t.spec.index)
            lag.append(round(now - last, 2) if last is not None else round(now - self.mono0, 2))
            oldest = t.terminal.store.outbox_stats().oldest
            age.append(0.0 if oldest is None else round(max(0.0, wall - oldest), 2))
            syncs.append(float(t.syncs))
            cpu.append(round(1000 * self.cpu.get(t.spec.index, 0.0), 2))
        return {"lag_s": lag, "outbox_age_s": age, "syncs": syncs, "cpu_ms": cpu}

    def take_requests(self) -> list[tuple[float, float, int]]:
        with self._req_lock:
            out, self.requests = self.requests, []
        return out

    def measure(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "rss_mib": round(rss_mib(), 1),
                "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "terminals": len(self.terminals),
                "syncs": sum(t.syncs for t in self.terminals),
                "sync_failures": sum(t.sync_failures for t in self.terminals),
                "counts": dict(self.counts)}  # fmt: skip

    def close(self) -> dict[str, Any]:
        if self.fleet is not None:
            self.fleet.close()
        return {}


def _outbox_written(t: SimTerminal) -> int:
    """How many outbox messages the terminal ever wrote: the highest seq its database
    handed out (``outbox.seq`` is AUTOINCREMENT: ``sqlite_sequence`` keeps it after the
    acknowledged rows are deleted). Read on the store's own connection (nothing else
    runs on it now): a second connection per terminal would leave its descriptors open
    while the store holds its locks (SQLite keeps them for the inode), and 5,000 of them
    ran a shard out of file descriptors at 10,000 terminals."""
    conn = t.terminal.store._conn  # no store method reads sqlite_sequence
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", ("outbox",)).fetchone()
    return 0 if row is None else int(row[0])


def serve(conn: Any, args: dict[str, Any]) -> None:
    """A shard's process: make the ``Shard``, then answer calls until ``close``."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    shard = Shard(**args)
    while True:
        try:
            method, kwargs = conn.recv()
        except EOFError:
            break
        try:
            result = getattr(shard, method)(**kwargs)
            conn.send(("ok", result))
        except BaseException:  # the coordinator raises it, naming the shard
            conn.send(("error", traceback.format_exc()))
        if method == "close":
            break
    with contextlib.suppress(Exception):
        shard.close()
    conn.close()
    os._exit(0)  # nothing left to flush: skip the interpreter's slow teardown
