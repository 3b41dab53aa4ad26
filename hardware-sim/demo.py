"""``make demo``: a simulated payment terminal through a network outage, then the control
plane it syncs with, in plain words.

The terminal daemon (``tillflow edge run``) runs as its own process, as it would under
systemd, beside simulated hardware: a card reader, a receipt printer and a network link
(``SimDeviceServer``), and an acquirer -- the bank's host -- (``SimAcquirer``). This
module plays the POS app: it talks to the daemon over its Unix socket and to the
simulators' control endpoints, and tells what happened and why:

  1. link up: a payment over the floor limit is approved online;
  2. network outage: small payments are approved offline within the risk limits, one
     that would pass the offline amount cap and one over the floor limit are declined;
  3. link back up, printer jammed: the saga reverses the authorisation;
  4. ``kill -9`` of the daemon while the acquirer is answering, restart, recovery: the
     same payment, never a second charge;
  5. the outbox for the cloud and the terminal's health;
  6. SIGTERM: a graceful stop;

then the same terminal joins the control plane (``hwsim.clouddemo``), which runs on an
embedded PostgreSQL unless ``TILLFLOW_DATABASE_URL`` is set:

  7. ``tillflow cloud serve --port 0`` starts;
  8. the terminal enrolls with an operator's token and hands over its outbox;
  9. the link goes down, sales offline, the link comes back, the outbox drains;
 10. an operator command (``request_health``) reaches it and is applied;
 11. everything stops;

then a config rolled out in waves to eight simulated terminals on serve and a worker
(``hwsim.rolloutdemo``):

 12. eight terminals of two hardware models enroll and take config version 1;
 13. a config that jams one model's printer: past the abort threshold, the saga
     restores every terminal that applied it and withdraws the version;
 14. a config every model takes: every terminal on it, healthy; everything stops.

Everything lives in a fresh temporary directory, removed at the end unless ``--keep``
(``make demo KEEP=1``) or something failed; the last lines say which. Exit status 0 only
if everything behaved as described.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hwsim import clouddemo, rolloutdemo
from hwsim.acquirer import LedgerEntry, SimAcquirer
from hwsim.demorig import (
    CURRENCY,
    FLOOR_LIMIT,
    MAX_SOCKET_PATH,
    OFFLINE_CAP,
    DemoError,
    Hardware,
    Terminal,
)
from hwsim.devices import SimDeviceServer


def say(text: str = "") -> None:
    print(
        textwrap.fill(
            text,
            width=92,
            subsequent_indent="     ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        if text
        else "",
        flush=True,
    )


def eur(minor: int | None) -> str:
    return "-" if minor is None else f"{minor / 100:.2f} {CURRENCY}"


@dataclass
class Check:
    scenario: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Checks:
    items: list[Check] = field(default_factory=list)

    def add(self, scenario: str, expected: str, observed: str, ok: bool) -> bool:
        self.items.append(Check(scenario, expected, observed, ok))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.items) and all(c.ok for c in self.items)


def describe(view: dict[str, Any]) -> str:
    decision = view.get("decision") or "?"
    bits = [f"{view['status']}", f"decision {decision}"]
    if view.get("channel"):
        bits.append(f"channel {view['channel']}")
    if view.get("reason"):
        bits.append(f"reason {view['reason']}")
    if view.get("auth_code"):
        bits.append(f"auth code {view['auth_code']}")
    if view.get("masked_pan"):
        bits.append(f"card {view['masked_pan']}")
    return ", ".join(bits)


def ledger_lines(entries: list[LedgerEntry]) -> list[str]:
    lines = []
    for e in entries:
        if e.operation == "reverse":
            what = "released the authorisation" if e.effect else "no effect"
            if e.response.reason:
                what += f" ({e.response.reason})"
            # The acquirer numbers every answer; a reversal's number is no auth code.
            what += f", answer {serial(e):06d} (no auth code)"
            line = f"reverse    {eur(e.amount_minor):>11}  {what}"
        else:
            answer = (
                f"approved, auth code {e.response.auth_code}"
                if e.response.approved
                else f"declined ({e.response.reason})"
            )
            line = f"{e.operation:<10} {eur(e.amount_minor):>11}  {e.masked_pan}  {answer}"
        if e.replays:
            line += f"; asked again {e.replays}x with the same key: same answer"
        lines.append(f"       {line}   [key {e.key[:8]}…]")
    return lines


def serial(entry: LedgerEntry) -> int:
    """The acquirer's running number of its answer (auth codes are the same number)."""
    return int(entry.response.acquirer_ref.removeprefix("SIM"))


def show_ledger(entries: list[LedgerEntry]) -> None:
    for line in ledger_lines(entries) or ["       (nothing)"]:
        print(line, flush=True)


def story(term: Terminal, hw: Hardware, acquirer: SimAcquirer, checks: Checks) -> None:
    """The six parts, in order; each adds its checks. The first failure raises."""

    def online() -> None:
        say("1. The link is up. A customer pays 42.00 EUR with a Visa card.")
        hw.insert("visa")
        view = term.pay(4_200, "pos-0001")
        say(f"   -> {describe(view)}")
        say(
            f"   42.00 EUR is over the floor limit ({eur(FLOOR_LIMIT)}), the most this terminal "
            "may approve on its own, so it asked the acquirer, which approved it online."
        )
        checks.add(
            "1. online, over the floor limit",
            "approved online",
            f"{view.get('decision')} {view.get('channel')}, auth {view.get('auth_code')}",
            view["status"] == "COMPLETED"
            and view.get("decision") == "approved"
            and view.get("channel") == "online"
            and bool(view.get("auth_code")),
        )

    def outage() -> None:
        say("2. The network goes down (the link stops answering). The shop keeps selling.")
        hw.link(False)
        before = len(acquirer.received)
        approved = []
        for n, (amount, card) in enumerate([(1_500, "mastercard"), (2_000, "amex")], start=2):
            hw.insert(card)
            view = term.pay(amount, f"pos-000{n}")
            approved.append(view)
            say(f"   {eur(amount)} with {card}: -> {describe(view)}")
        say(
            "   Both are under the floor limit and their total (35.00 EUR) is within the "
            f"offline amount cap ({eur(OFFLINE_CAP)}): the terminal approved them offline, "
            "on its own, and will send them to the cloud when the link is back."
        )
        ok_offline = all(
            v["status"] == "COMPLETED"
            and v.get("decision") == "approved"
            and v.get("channel") == "offline"
            for v in approved
        )
        checks.add(
            "2a. offline, two small payments",
            "approved offline x2",
            " + ".join(f"{v.get('decision')} {v.get('channel')}" for v in approved),
            ok_offline,
        )
        hw.insert("visa")
        capped = term.pay(1_000, "pos-0004")
        say(f"   10.00 EUR with visa: -> {describe(capped)}")
        say(
            "   Under the floor limit, but 35.00 + 10.00 = 45.00 EUR of unsent offline "
            f"approvals would pass the offline amount cap ({eur(OFFLINE_CAP)}): declined, and "
            "the decline names the limit it hit."
        )
        checks.add(
            "2b. offline, past the amount cap",
            "declined offline_amount_cap",
            f"{capped.get('decision')} {capped.get('reason')}",
            capped.get("decision") == "declined" and capped.get("reason") == "offline_amount_cap",
        )
        hw.insert("mastercard")
        floor = term.pay(3_000, "pos-0005")
        say(f"   30.00 EUR with mastercard: -> {describe(floor)}")
        say(
            "   30.00 EUR is over the floor limit: it needs the acquirer, which cannot be "
            "reached, so it is declined (floor_limit). The customer can pay another way."
        )
        checks.add(
            "2c. offline, over the floor limit",
            "declined floor_limit",
            f"{floor.get('decision')} {floor.get('reason')}",
            floor.get("decision") == "declined" and floor.get("reason") == "floor_limit",
        )
        reached = len(acquirer.received) - before
        say(f"   The acquirer received {reached} request(s) during the outage.")
        checks.add(
            "2d. the acquirer during the outage",
            "no request",
            f"{reached} request(s)",
            reached == 0,
        )

    def jam() -> None:
        say("3. The link is back. Next customer pays 30.00 EUR, but the receipt printer jams.")
        hw.link(True)
        hw.printer("jam")
        hw.insert("visa")
        first = term.pay(3_000, "pos-0006")
        say(
            f"   -> first answer: {describe(first)} (the print failed; the step is retried "
            "a few times, the daemon picks the retries up)"
        )
        view = term.settle(first["run_id"])
        hw.printer("ok")
        say(f"   -> in the end: {describe(view)}")
        entries = [
            e
            for e in acquirer.ledger.values()
            if e.amount_minor == 3_000 and e.operation in ("authorize", "reverse")
        ]
        say("   The acquirer's ledger for this payment:")
        show_ledger(entries)
        auths = [e for e in entries if e.operation == "authorize" and e.effect]
        reversals = [e for e in entries if e.operation == "reverse" and e.effect]
        net = sum(e.amount_minor for e in auths) - sum(e.amount_minor for e in reversals)
        say(
            f"   Net for this payment: {eur(net)}. The card was authorised online, the jam "
            "persisted, and the payment workflow is a saga: it undid what it had done, in "
            "reverse order, and reversed the authorisation. The customer is not charged."
        )
        for r in reversals:
            say(
                "   The acquirer numbers every answer it gives, auth codes included: the "
                f"reversal took {serial(r):06d}, so the next auth code skips that number."
            )
        checks.add(
            "3. printer jam after approval",
            "reversed: auth + reverse, net 0",
            f"{view['status']}, {len(auths)} auth + {len(reversals)} reverse, net {eur(net)}",
            view["status"] == "ROLLED_BACK"
            and view.get("decision") == "reversed"
            and len(auths) == 1
            and len(reversals) == 1
            and net == 0,
        )

    def crash() -> None:
        say(
            "4. A customer pays 50.00 EUR. The acquirer is slow today; while the terminal waits "
            "for its answer, the daemon is killed with kill -9 (think: a power cut)."
        )
        acquirer.set_mode("slow", latency_s=8.0)
        hw.insert("visa")
        outcome: dict[str, str] = {}

        def pos() -> None:
            try:
                term.pay(5_000, "pos-0007")
                outcome["pos"] = "it got an answer (unexpected)"
            except httpx.HTTPError as exc:
                outcome["pos"] = f"no answer, the connection closed ({type(exc).__name__})"
            except DemoError as exc:
                outcome["pos"] = str(exc)

        def recorded() -> list[LedgerEntry]:
            return [e for e in acquirer.ledger.values() if e.amount_minor == 5_000]

        thread = threading.Thread(target=pos, name="pos-in-flight", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not recorded() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the acquirer has recorded the authorisation
        if not recorded():
            raise DemoError("the authorisation never reached the acquirer")
        code = term.kill9()
        thread.join(10)
        acquirer.set_mode("approve")
        before = recorded()
        first_code = before[0].response.auth_code
        skipped = [
            f"{serial(e):06d}"
            for e in acquirer.ledger.values()
            if e.operation == "reverse" and e is not before[0]
        ]
        died = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        say(
            f"   The daemon died ({died}). The acquirer had already approved the charge, but "
            "its answer never reached the terminal. The POS app's request failed: "
            f"{outcome.get('pos', 'it is still waiting')}. The acquirer's ledger:"
        )
        show_ledger(before)
        if skipped:
            say(
                f"   (Auth code {first_code}, not the next one: {', '.join(skipped)} went to the "
                "reversal in 3.)"
            )
        say("   Restarting the daemon (as systemd would)...")
        status = term.start()
        m = re.search(r"recovered (\d+) run", status)
        recovered = int(m.group(1)) if m else -1
        say(f"   READY again. Its status line: “{status}”.")
        say(
            f"   On start it recovered {recovered} run(s): the payment that was in flight. It "
            "asked the acquirer again with the same idempotency key; the acquirer recognised "
            "the request and answered with its first approval instead of charging again."
        )
        view = term.pay(5_000, "pos-0007")
        say(f"   The POS app retries with the same key (pos-0007): -> {describe(view)}")
        again = term.run(view["run_id"])
        say(
            f"   GET /v1/runs/{view['run_id']}: {again['status']}, {again.get('decision')}, "
            f"auth code {again.get('auth_code')} (the code the acquirer gave before the crash: "
            f"{first_code})."
        )
        after = recorded()
        charges = [e for e in after if e.operation == "authorize" and e.effect]
        say("   The acquirer's ledger for this payment now:")
        show_ledger(after)
        say(
            f"   {len(charges)} charge for 50.00 EUR: the same payment, resumed, never a "
            "second one."
        )
        checks.add(
            "4a. kill -9 mid-payment, restart",
            "recovered 1 run",
            f"recovered {recovered} run(s)",
            code == -signal.SIGKILL and recovered == 1,
        )
        checks.add(
            "4b. retry with the same key",
            "same payment, approved, 1 charge",
            f"{again['status']} {again.get('decision')}, auth {again.get('auth_code')}, "
            f"{len(charges)} charge(s)",
            again["status"] == "COMPLETED"
            and again.get("decision") == "approved"
            and again.get("auth_code") == first_code
            and len(charges) == 1,
        )

    def summary() -> None:
        db = term.data_dir / "terminal.db"
        say(f"5. What the terminal holds for the cloud: tillflow edge outbox --db {db}")
        out = subprocess.run(
            [sys.executable, "-m", "edge.cli", "edge", "outbox", "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for line in (out.stdout or out.stderr).splitlines():
            print(f"     {line}", flush=True)
        depth_m = re.search(r"outbox: (\d+) message", out.stdout or "")
        depth = int(depth_m.group(1)) if depth_m else -1
        health = term.request("GET", "/v1/health")
        oldest = health["outbox_oldest_age_s"]
        age = "-" if oldest is None else f"{oldest:.0f} s old"
        say(
            f"   GET /v1/health: link {'up' if health['link_up'] else 'down'}; outbox "
            f"{health['outbox_depth']} message(s), oldest {age}; "
            f"offline exposure {eur(health['offline_exposure_minor'])} in "
            f"{health['offline_count']} payment(s); database {health['db_bytes']} bytes of "
            f"{health['db_budget_bytes']}; last error: {health['last_error'] or 'none'}."
        )
        say(
            "   Every payment that ended is recorded for the cloud, declines included, and "
            "the reversed one as reversed (the acquirer saw it authorised, so the cloud "
            "must hear it was undone). The two offline approvals count against the "
            "offline cap until the cloud acknowledges them."
        )
        checks.add(
            "5. outbox and health",
            "7 messages, offline 35.00 EUR in 2",
            f"{depth} messages, offline {eur(health['offline_exposure_minor'])} "
            f"in {health['offline_count']}",
            out.returncode == 0
            and depth == health["outbox_depth"] == 7
            and health["offline_exposure_minor"] == 3_500
            and health["offline_count"] == 2
            and health["link_up"] is True,
        )

    def stop() -> None:
        say("6. Closing time: SIGTERM, as systemd sends on stop.")
        code = term.terminate()
        say(
            f"   The daemon said STOPPING=1, let requests in flight finish, checkpointed the "
            f"database and exited with code {code}."
        )
        checks.add("6. SIGTERM", "graceful stop, exit 0", f"exit {code}", code == 0)

    for scenario in (online, outage, jam, crash, summary, stop):
        scenario()
        say()


def print_summary(checks: Checks, failure: str | None) -> None:
    head = ("scenario", "expected", "observed")
    rows = [(c.scenario, c.expected, c.observed) for c in checks.items]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]

    def row(cells: tuple[str, str, str], mark: str) -> str:
        return "  " + "  ".join(f"{v:<{w}}" for v, w in zip(cells, widths, strict=True)) + mark

    say("Summary: what each scenario should do, and what it did")
    print(row(head, "").rstrip(), flush=True)
    print("  " + "  ".join("-" * w for w in widths), flush=True)
    for c, r in zip(checks.items, rows, strict=True):
        print(row(r, "  ✓" if c.ok else "  ✗"), flush=True)
    if failure:
        print(f"  (the demo stopped early: {failure})", flush=True)
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwsim.demo",
        description="a simulated terminal: daemon, POS, acquirer, through a network outage",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (config, daemon log, database) for a look around",
    )
    # The default since --keep came; still accepted so that older scripts run.
    parser.add_argument("--clean", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with contextlib.suppress(AttributeError, ValueError):  # a ✓ must not crash a C locale
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]

    work = Path(tempfile.mkdtemp(prefix="tf-demo-"))
    sock_dir = work
    if len(str(work / "notify")) > MAX_SOCKET_PATH:  # a long TMPDIR: sockets go to /tmp
        sock_dir = Path(tempfile.mkdtemp(prefix="tf-demo-", dir="/tmp"))
    checks = Checks()
    failure: str | None = None
    devices = SimDeviceServer()
    acquirer = SimAcquirer()
    term: Terminal | None = None
    try:
        devices.start()
        acquirer.start()
        term = Terminal(work, sock_dir, devices.url, acquirer.url)
        say(
            "Tillflow demo: a payment terminal, simulated, through a network outage; then "
            "the control plane it syncs with."
        )
        say(
            f"The terminal daemon runs as its own process (tillflow edge run --config "
            f"{term.config}), beside a simulated card reader, printer and network link "
            f"({devices.url}) and a simulated acquirer, the bank's host ({acquirer.url}). "
            "This demo plays the POS app, talking to the daemon over its Unix socket."
        )
        say(
            f"Risk limits: floor limit {eur(FLOOR_LIMIT)} (larger payments need the acquirer), "
            f"offline amount cap {eur(OFFLINE_CAP)} (unsent offline approvals in total)."
        )
        status = term.start()
        say(f"The daemon is READY (sd_notify). Its status line: “{status}”.")
        say()
        story(term, Hardware(devices), acquirer, checks)
        term.close()
        clouddemo.story(work, sock_dir, devices, acquirer.url, add=checks.add, say=say, eur=eur)
        say()
        rolloutdemo.story(work / "rollouts", add=checks.add, say=say)
    except Exception as exc:  # report it, and still clean up and summarise
        failure = f"{type(exc).__name__}: {exc}"
        say(f"!! {failure}")
        if term is not None:
            say("   The daemon's last log lines:")
            print(textwrap.indent(term.log_tail(), "     | "), flush=True)
    finally:
        if term is not None:
            term.close()
        acquirer.stop()
        devices.stop()
    print_summary(checks, failure)
    ok = failure is None and checks.ok
    if ok:
        say("Everything behaved as described.")
    else:
        failed = [c.scenario for c in checks.items if not c.ok]
        say(
            "SOMETHING DID NOT BEHAVE AS DESCRIBED: "
            + ("; ".join(failed) if failed else "")
            + (f"{'; ' if failed else ''}stopped early ({failure})" if failure else "")
        )
    dirs = [work] if sock_dir == work else [work, sock_dir]
    if ok and not args.keep:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        say(
            f"Removed {' and '.join(map(str, dirs))}; to keep it for a look around: "
            "make demo KEEP=1 (python -m hwsim.demo --keep)."
        )
    else:
        why = "as asked (--keep)" if args.keep else "because something failed"
        say(
            f"Kept {' and '.join(map(str, dirs))} {why}: edge.yaml, daemon.log, "
            f"data/terminal.db; e.g. .venv/bin/tillflow list --db "
            f"{work / 'data' / 'terminal.db'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
