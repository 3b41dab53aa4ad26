"""``make demo``: a simulated payment terminal through a network outage, in plain words.

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
  6. SIGTERM: a graceful stop.

Everything lives in a fresh temporary directory, removed at the end unless ``--keep``
(``make demo KEEP=1``) or something failed; the last lines say which. Exit status 0 only
if everything behaved as described.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
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
from hwsim.acquirer import LedgerEntry, SimAcquirer
from hwsim.devices import SimDeviceServer

#: Risk limits small enough to reach a cap in a few payments (minor units: cents).
FLOOR_LIMIT = 2_500
OFFLINE_CAP = 4_000
#: Bounded waits (seconds): nothing in the demo waits for ever.
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 20.0
#: The daemon trusts one link check for 1 s (``DEFAULT_LINK_CACHE_S``): wait a bit longer
#: after switching the link, so the next payment sees the change.
LINK_SETTLE_S = 1.2
#: AF_UNIX paths must stay under ~108 bytes.
MAX_SOCKET_PATH = 100

CURRENCY = "EUR"


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


class DemoError(Exception):
    """Something the demo needed did not happen (in time)."""


class Terminal:
    """The daemon process, its notify socket, and the POS side of its local API."""

    def __init__(self, work: Path, sock_dir: Path, devices: str, acquirer: str) -> None:
        self.work = work
        self.data_dir = work / "data"
        self.socket_path = sock_dir / "edge.sock"
        self.notify_path = sock_dir / "notify"
        self.config = work / "edge.yaml"
        self.log = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config.write_text(
            "# Written by the demo (hwsim.demo): a terminal beside simulated hardware.\n"
            "device_id: T-DEMO\n"
            f"data_dir: {self.data_dir}\n"
            f"socket_path: {self.socket_path}\n"
            "log_format: text\n"
            "risk:\n"
            f"  floor_limit_minor: {FLOOR_LIMIT}\n"
            f"  offline_amount_cap_minor: {OFFLINE_CAP}\n"
            "  online_random_percent: 0\n"
            "peripherals:\n"
            f"  card_reader: {{url: '{devices}', timeout_s: 5}}\n"
            f"  printer: {{url: '{devices}'}}\n"
            f"  link: {{url: '{devices}/link'}}\n"
            f"  acquirer: {{url: '{acquirer}', timeout_s: 5}}\n",
            encoding="utf-8",
        )
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)

    # --- the process ----------------------------------------------------------------------

    def start(self) -> str:
        """Start the daemon; return the STATUS it sent with READY=1."""
        self._drain()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        cmd = [sys.executable, "-m", "edge.cli", "edge", "run", "--config", str(self.config)]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        message = self.wait_notify("READY=1", READY_TIMEOUT_S)
        return _field(message, "STATUS") or ""

    def wait_notify(self, wanted: str, timeout_s: float) -> str:
        """The first sd_notify message holding ``wanted`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise DemoError(
                        f"the daemon exited with code {self.proc.returncode} before "
                        f"{wanted}; see {self.log}"
                    ) from None
                continue
            if wanted in message.splitlines():
                return message
        raise DemoError(f"no {wanted} from the daemon within {timeout_s:g}s; see {self.log}")

    def _drain(self) -> None:
        while True:
            try:
                self.notify.recv(4096)
            except TimeoutError:
                return

    def kill9(self) -> int | None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no goodbye, no checkpoint
        return self.proc.wait(10)

    def terminate(self) -> int | None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.wait_notify("STOPPING=1", STOP_TIMEOUT_S)
        return self.proc.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        """Whatever happened: no daemon left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.notify.close()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- the POS app's requests -----------------------------------------------------------

    def client(self, timeout_s: float = 20.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, timeout=timeout_s, base_url="http://pos")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            r = c.request(method, path, json=body)
        if r.status_code != 200:
            raise DemoError(f"{method} {path} answered {r.status_code}: {r.text}")
        return r.json()

    def pay(self, amount: int, key: str) -> dict[str, Any]:
        body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
        return dict(self.request("POST", "/v1/payments", body))

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/runs/{run_id}"))

    def settle(self, run_id: str) -> dict[str, Any]:
        """Poll the run until it ends (its retries are picked up by the daemon's loop)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            view = self.run(run_id)
            if view["status"] in ("COMPLETED", "FAILED", "ROLLED_BACK", "CANCELLED"):
                return view
            time.sleep(0.2)
        raise DemoError(f"run {run_id} did not end within {RUN_TIMEOUT_S:g}s")


def _field(message: str, name: str) -> str | None:
    for line in message.splitlines():
        if line.startswith(f"{name}="):
            return line[len(name) + 1 :]
    return None


class Hardware:
    """The simulators' control endpoints, as an operator (or a test rig) uses them."""

    def __init__(self, devices: SimDeviceServer) -> None:
        self.devices = devices

    def control(self, path: str, body: dict[str, Any]) -> None:
        r = httpx.post(f"{self.devices.url}/control/{path}", json=body, timeout=5)
        if r.status_code != 200:
            raise DemoError(f"control/{path} answered {r.status_code}: {r.text}")

    def insert(self, card: str) -> None:
        self.control("insert", {"card": card})

    def link(self, up: bool) -> None:
        self.control("link", {"up": up})
        time.sleep(LINK_SETTLE_S)

    def printer(self, state: str) -> None:
        self.control("printer", {"state": state})


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
        say("Tillflow demo: a payment terminal, simulated, through a network outage.")
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
