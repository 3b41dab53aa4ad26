"""The terminal's database size over a simulated week of traffic, with retention on,
against the same traffic with retention off (the baseline, measured in the same run).

    python bench/storage.py [--quick] [--days N] [--per-day N] [--retention-hours H]

One ``edge.terminal.service.terminal.Terminal`` per leg, in this process, on ``SqliteStore``
(FULL), a virtual clock (``FakeClock``), in-process simulators (card reader, printer,
network link) and ``HttpAcquirer`` to a ``SimAcquirer`` on loopback. Each day has
``--per-day`` payments spread evenly; the link is down two hours a day (those sales are
approved offline, within the risk limits), a tenth of the rest go online.

Every simulated hour "the cloud" acknowledges the outbox and the audit log up to their
ends (``Terminal.acknowledge``, as the sync will) and the terminal runs a maintenance
pass (``Terminal.maintain``: retention with ``--retention-hours``, incremental vacuum,
TRUNCATE checkpoint). The baseline leg gets the same acknowledgements and checkpoints
but no retention (``retention_hours`` beyond the run), so only its outbox shrinks.

Figures: database file bytes (+ WAL) at the end of each day, rows kept, and
``ratio = with_retention.final_bytes / without_retention.final_bytes``.
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import FakeClock
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service.terminal import Terminal

DAY = 86_400.0
HOUR = 3_600.0
CARDS = ("visa", "mastercard", "amex")


def _rows(terminal: Terminal) -> dict[str, int]:
    conn = terminal.store._conn  # a read on the store's own connection, between steps
    counts: dict[str, int] = {}
    for table in ("workflow_runs", "workflow_steps", "workflow_audit_log", "outbox", "counters"):
        counts[table] = int(conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
    return counts


def _size(terminal: Terminal) -> dict[str, int]:
    st = terminal.store.storage()
    return {"file_bytes": st.file_bytes, "wal_bytes": st.wal_bytes, "used_bytes": st.used_bytes}


def leg(
    name: str, root: Path, *, days: int, per_day: int, retention_hours: float
) -> dict[str, Any]:
    clock = FakeClock(1_800_000_000.0)
    reader, printer, link = SimCardReader(), SimPrinter(), SimNetworkLink(clock)
    with SimAcquirer() as acquirer, HttpAcquirer(acquirer.url, link=link, timeout_s=5) as http:
        cfg = EdgeConfig(
            device_id=f"T-{name}",
            data_dir=root / name,
            socket_path=root / f"{name}.sock",
            retention_hours=retention_hours,
            risk=RiskLimits(
                online_random_percent=10,
                offline_count_cap=10_000,
                offline_amount_cap_minor=10**9,
                velocity_max=10_000,
            ),
        )
        terminal = Terminal(cfg, Peripherals(reader, printer, http, link), clock=clock)
        gap = DAY / per_day
        by_day: list[dict[str, Any]] = []
        outcomes = {"approved": 0, "declined": 0}
        started = time.perf_counter()
        next_hour = clock.now() + HOUR
        try:
            for day in range(days):
                for i in range(per_day):
                    hour_of_day = (i * gap) / HOUR
                    (link.down if 2 <= hour_of_day < 4 else link.up)()
                    reader.insert(make_card(CARDS[i % len(CARDS)]))
                    run_id = terminal.engine.start(
                        "payment",
                        {"amount_minor": 500 + (i % 40) * 50, "currency": "EUR"},
                        idempotency_key=f"{name}-{day}-{i}",
                    )
                    decision = terminal.engine.get(run_id).state.get("decision")
                    outcomes["approved" if decision == "approved" else "declined"] += 1
                    clock.advance(gap)
                    if clock.now() >= next_hour:
                        next_hour += HOUR
                        link.up()
                        stats = terminal.store.outbox_stats()
                        head = terminal.store.audit_head()
                        terminal.acknowledge(stats.last_seq, head[0] if head else None)
                        terminal.maintain()
                by_day.append({"day": day + 1, **_size(terminal)})
                print(f"{name}: day {day + 1} {by_day[-1]}", file=sys.stderr)
            return {
                "retention_hours": retention_hours,
                "payments": days * per_day,
                **outcomes,
                "seconds": round(time.perf_counter() - started, 1),
                "by_day": by_day,
                "final": {**_size(terminal), **_rows(terminal)},
            }
        finally:
            terminal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 days x 300 payments")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--per-day", type=int, default=600)
    parser.add_argument("--retention-hours", type=float, default=24.0)
    args = parser.parse_args(argv)
    days, per_day = (2, 300) if args.quick else (args.days, args.per_day)
    with tempfile.TemporaryDirectory(prefix="tf-bench-storage-") as tmp:
        root = Path(tmp)
        kept = leg(
            "retention", root, days=days, per_day=per_day, retention_hours=args.retention_hours
        )
        base = leg("no-retention", root, days=days, per_day=per_day, retention_hours=10**6)
    total = lambda r: r["final"]["file_bytes"] + r["final"]["wal_bytes"]  # noqa: E731
    print(
        json.dumps(
            {
                "bench": "storage",
                "days": days,
                "payments_per_day": per_day,
                "with_retention": kept,
                "without_retention": base,
                "ratio": round(total(kept) / total(base), 3),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
