"""What the terminals say they did, held against what the cloud holds: the fleet
reconciliation (``tillflow cloud reconcile``; the fleet simulator's last step).

Each terminal's account (``TerminalAccount``, one JSON object a line) says: its device
id, its database id (the sync stream), every payment run it started and which of them
it approved for good, how many outbox messages it ever wrote (``outbox_last_seq``) and
how many are still unsent, and the head of its audit chain. ``reconcile`` reads the
cloud's side in a few bulk queries (one pass over ``sync_messages``, ``audit_chains``,
``quarantine``; every value a bound parameter) and checks, per terminal:

* every sale it approved is in the cloud exactly once (one ``payment`` message for the
  run), and no payment the cloud holds for it is a run the terminal does not know;
* every message it wrote arrived once: the cloud holds seqs 1..``outbox_last_seq`` of its
  stream (count and highest equal), and its outbox is drained (nothing unsent);
* its audit chain verifies in the cloud (``state = ok``) and ends at the terminal's head
  (same seq, same hash);
* nothing of it sits in quarantine.

A check's examples name the first few terminals that break it. Nothing is written.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

EXAMPLES = 10


@dataclass
class TerminalAccount:
    device_id: str
    name: str
    stream: str
    payments: list[str]
    approved: list[str]
    outbox_last_seq: int
    outbox_depth: int
    audit_head: tuple[int, str] | None

    @classmethod
    def parse(cls, line: str) -> TerminalAccount:
        d = json.loads(line)
        head = d.get("audit_head")
        return cls(
            device_id=str(d["device_id"]),
            name=str(d.get("name") or d["device_id"]),
            stream=str(d["stream"]),
            payments=[str(r) for r in d.get("payments", [])],
            approved=[str(r) for r in d.get("approved", [])],
            outbox_last_seq=int(d.get("outbox_last_seq", 0)),
            outbox_depth=int(d.get("outbox_depth", 0)),
            audit_head=None if head is None else (int(head[0]), str(head[1])),
        )


@dataclass
class Check:
    name: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.violations += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(what)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.violations == 0, "checked": self.checked,
                "violations": self.violations, "examples": self.examples}  # fmt: skip


SALES_ONCE = "every approved sale is in the cloud exactly once"
NO_UNKNOWN = "no sale the cloud holds is unknown to its terminal"
MESSAGES = "every outbox message arrived once (seqs 1..last, none missing)"
DRAINED = "no outbox is left undrained"
CHAIN = "every audit chain verifies in the cloud and ends at the terminal's head"
QUARANTINE = "nothing quarantined"

_PAYMENTS = """
SELECT device_id, run_id, count(*) FROM sync_messages
WHERE topic = 'payment' AND device_id = ANY(%s) GROUP BY device_id, run_id
"""
_STREAMS = """
SELECT device_id, stream, count(*), max(seq) FROM sync_messages
WHERE device_id = ANY(%s) GROUP BY device_id, stream
"""
_CHAINS = """
SELECT device_id, stream, chain, head_seq, head_hash, state, first_bad_seq, reason
FROM audit_chains WHERE device_id = ANY(%s)
"""
_QUARANTINE = "SELECT device_id, count(*) FROM quarantine WHERE device_id = ANY(%s) GROUP BY 1"


def reconcile(
    conn: psycopg.Connection[Any], accounts: Iterable[TerminalAccount], batch: int = 2000
) -> dict[str, Any]:
    """The checks (see the module doc) over ``accounts``, read ``batch`` devices a query."""
    checks = {n: Check(n) for n in (SALES_ONCE, NO_UNKNOWN, MESSAGES, DRAINED, CHAIN, QUARANTINE)}
    terminals = 0
    chunk: list[TerminalAccount] = []
    for account in accounts:
        chunk.append(account)
        terminals += 1
        if len(chunk) >= batch:
            _chunk(conn, chunk, checks)
            chunk = []
    if chunk:
        _chunk(conn, chunk, checks)
    views = [c.view() for c in checks.values()]
    return {"ok": all(v["ok"] for v in views), "terminals": terminals, "checks": views}


def _chunk(
    conn: psycopg.Connection[Any], chunk: list[TerminalAccount], checks: dict[str, Check]
) -> None:
    ids = [a.device_id for a in chunk]
    payments: dict[str, dict[str, int]] = defaultdict(dict)
    streams: dict[tuple[str, str], tuple[int, int]] = {}
    chains: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    quarantined: dict[str, int] = {}
    with conn.cursor() as cur:
        for device, run_id, n in cur.execute(_PAYMENTS, (ids,)):
            payments[device][str(run_id)] = int(n)
        for device, stream, n, top in cur.execute(_STREAMS, (ids,)):
            streams[(device, stream)] = (int(n), int(top))
        for row in cur.execute(_CHAINS, (ids,)):
            chains[(row[0], row[1])].append(row)
        for device, n in cur.execute(_QUARANTINE, (ids,)):
            quarantined[device] = int(n)
    for a in chunk:
        held = payments.get(a.device_id, {})
        c = checks[SALES_ONCE]
        for run_id in a.approved:
            c.checked += 1
            if held.get(run_id, 0) != 1:
                c.fail(
                    f"{a.name} ({a.device_id}): sale {run_id} held {held.get(run_id, 0)} time(s)"
                )
        c = checks[NO_UNKNOWN]
        known = set(a.payments)
        for run_id in held:
            c.checked += 1
            if run_id not in known:
                c.fail(f"{a.name} ({a.device_id}): the cloud holds sale {run_id}, unknown to it")
        c = checks[MESSAGES]
        c.checked += 1
        n, top = streams.get((a.device_id, a.stream), (0, 0))
        if (n, top) != (a.outbox_last_seq, a.outbox_last_seq):
            c.fail(
                f"{a.name}: wrote {a.outbox_last_seq} message(s), cloud holds {n} (highest {top})"
            )
        c = checks[DRAINED]
        c.checked += 1
        if a.outbox_depth:
            c.fail(f"{a.name}: {a.outbox_depth} message(s) still unsent")
        c = checks[CHAIN]
        c.checked += 1
        rows = chains.get((a.device_id, a.stream), [])
        broken = [r for r in rows if r[5] != "ok"]
        if broken:
            r = broken[0]
            c.fail(f"{a.name}: chain {r[2]} broken at seq {r[6]}: {r[7]}")
        elif a.audit_head is not None:
            head = [r for r in rows if r[2] == 0]
            if not head or (int(head[0][3]), str(head[0][4])) != a.audit_head:
                got = "nothing" if not head else f"seq {head[0][3]}"
                c.fail(f"{a.name}: its audit head is seq {a.audit_head[0]}, the cloud's is {got}")
        c = checks[QUARANTINE]
        c.checked += 1
        if quarantined.get(a.device_id):
            c.fail(f"{a.name}: {quarantined[a.device_id]} item(s) quarantined")
