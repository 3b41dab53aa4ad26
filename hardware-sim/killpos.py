"""The kill -9 torture's POS app: one transaction at a time over the daemon's local API.

``_Pos`` pays, refunds and voids like a real POS: a request a kill cut off is sent again
with the SAME idempotency key once the daemon is back (it waits at the ``_Gate``), until
it gets an answer, and an answer that is not final yet is polled until it is; a payment
shown ``unknown``/``reversal_pending`` is polled through the reversal. What it sent and
was told goes into a ``hwsim.killcheck.PosBook``, for the checker; what it finds wrong
on the way (an HTTP error, a key answered with two runs, no final answer) is an anomaly
there. The amounts it picks straddle the terminal's floor limit and the acquirer's.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from hwsim.devices import SimDeviceServer
from hwsim.killcheck import TERMINAL_STATUSES, PosBook, PosOutcome
from hwsim.killdaemon import POLL_S, _Gate

# Risk limits: small payments may be approved offline; the offline caps are out of reach
# (the cloud acknowledges only at the daemon's sync turns: real caps would decline much).
FLOOR_LIMIT = 2_500
#: The acquirer declines authorisations above this: online declines.
ACQUIRER_LIMIT = 9_000
CURRENCY = "EUR"

# Bounded waits, in seconds. Reached only when something is broken.
REQUEST_TIMEOUT_S = 20.0
#: A run the POS holds that is not final yet (a retry backoff: at most 3 x 5 s, plus the
#: daemon's 1 s loop) must end within this.
RUN_TIMEOUT_S = 30.0
#: How long the POS waits for the daemon to come back after a kill.
GATE_TIMEOUT_S = 60.0
#: A payment the POS was shown ``reversal_pending`` must be settled within this, from
#: then (the outage, then the reversal's growing backoff: 1, 2, 4, 8 s...).
REVERSAL_TIMEOUT_S = 90.0
#: Mean pause between two transactions: a busy till, not a benchmark (the database, and
#: so each check's cost, grows with the transactions).
THINK_S = 0.02

_CARDS = {"visa": 30, "mastercard": 30, "amex": 25, "hot_listed": 8, "bad_luhn": 4, "expired": 3}


class _Pos(threading.Thread):
    """One POS app: a transaction at a time, retried with the same key after a kill."""

    def __init__(
        self,
        rng: random.Random,
        sock: Path,
        devices: SimDeviceServer,
        gate: _Gate,
        book: PosBook,
    ) -> None:
        super().__init__(name="pos", daemon=True)
        self.rng = rng
        self.sock = sock
        self.devices = devices
        self.gate = gate
        self.book = book
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._seq = 0
        self._approved: list[str] = []  # payment run ids approved, not yet voided

    def run(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self.sock))
        try:
            with httpx.Client(
                transport=transport, base_url="http://pos", timeout=REQUEST_TIMEOUT_S
            ) as client:
                while not self.stop.is_set():
                    self._transact(client, *self._next())
                    self.stop.wait(self.rng.expovariate(1 / THINK_S))  # the next customer
        except BaseException as exc:  # reported by the controller
            self.error = exc

    def top_up_card(self) -> None:
        """The customer's card is on the reader whenever the daemon may read one."""
        if self.devices.reader.queued == 0:
            names, weights = zip(*_CARDS.items(), strict=True)
            self.devices.insert_test_card(self.rng.choices(names, weights)[0])

    def _next(self) -> tuple[str, str, dict[str, Any]]:
        self._seq += 1
        key = f"k{self._seq:07d}"
        roll = self.rng.random()
        if roll < 0.10 and self._approved:
            payment = self._approved.pop(self.rng.randrange(len(self._approved)))
            return "void", "/v1/voids", {"payment_run_id": payment, "idempotency_key": key}
        if roll < 0.20:
            amount = self.rng.randint(100, 5_000)
            body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
            return "refund", "/v1/refunds", body
        size = self.rng.random()
        if size < 0.55:
            amount = self.rng.randint(100, FLOOR_LIMIT)
        elif size < 0.9:
            amount = self.rng.randint(FLOOR_LIMIT + 1, ACQUIRER_LIMIT)
        else:
            amount = self.rng.randint(ACQUIRER_LIMIT + 1, 20_000)
        body = {"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key}
        return "payment", "/v1/payments", body

    def _transact(self, client: httpx.Client, kind: str, path: str, body: dict[str, Any]) -> None:
        key = str(body["idempotency_key"])
        with self.book.lock:
            self.book.sent[key] = kind
        retried = False
        deadline = time.monotonic() + RUN_TIMEOUT_S + GATE_TIMEOUT_S
        view: dict[str, Any] | None = None
        while view is None or not self._final(view, key):
            if view is not None and view.get("decision") == "unknown" and kind != "refund":
                deadline = self._pending(view, kind, key, deadline)
            if time.monotonic() > deadline:
                self._anomaly(f"{kind} {key}: no final answer within the deadline; last {view}")
                return
            try:
                if view is None:
                    self.top_up_card()
                    view = self._answer(client.post(path, json=body), kind, key)
                else:
                    self.stop.wait(POLL_S)  # not final yet (a retry backoff): poll
                    view = self._answer(client.get(f"/v1/runs/{view['run_id']}"), kind, key)
            except httpx.TransportError as exc:
                # The daemon died under the request: ask again, same key, once it is back.
                _close_sockets_of(exc)
                view = None
                with self.book.lock:
                    self.book.retries += 1
                    if not retried:
                        self.book.retried += 1
                retried = True
                if not self.gate.wait(GATE_TIMEOUT_S):
                    self._anomaly(f"{kind} {key}: the daemon did not come back")
                    return
                continue
            if view is None:
                return  # an error answer, recorded
        outcome = PosOutcome(
            kind,
            str(view["run_id"]),
            str(view["status"]),
            view.get("decision"),
            view.get("channel"),
            view.get("reason"),
        )
        with self.book.lock:
            self.book.outcomes[key] = outcome
        if kind == "payment" and outcome.status == "COMPLETED" and outcome.decision == "approved":
            self._approved.append(outcome.run_id)

    def _final(self, view: dict[str, Any], key: str) -> bool:
        """Whether ``view`` is the transaction's last word. A payment's or void's
        ``unknown`` never is (the terminal is releasing what the acquirer may hold): the
        POS polls on; one finished ``unknown`` is reported. (A refund may end unknown:
        README, known limits.)"""
        if view.get("status") not in TERMINAL_STATUSES:
            return False
        if view.get("decision") == "unknown" and view.get("workflow") != "refund":
            self._anomaly(f"{key}: run {view['run_id']} finished {view['status']} unknown")
        return True

    def _pending(self, view: dict[str, Any], kind: str, key: str, deadline: float) -> float:
        """A run shown ``unknown``: check what the POS is told, and give the reversal
        its time (the outage, then its backoff); returns the new deadline."""
        with self.book.lock:
            first = key not in self.book.pending_seen
            self.book.pending_seen.add(key)
        if first:
            if view.get("reason") != "reversal_pending" or view.get("auth_code"):
                self._anomaly(f"{kind} {key}: unknown, but shown {view}")
            if not view.get("customer_message"):
                self._anomaly(f"{kind} {key}: reversal pending with nothing to tell the customer")
            return max(deadline, time.monotonic() + REVERSAL_TIMEOUT_S)
        return deadline

    def _answer(self, response: httpx.Response, kind: str, key: str) -> dict[str, Any] | None:
        if response.status_code != 200:
            self._anomaly(f"{kind} {key}: HTTP {response.status_code}: {response.text[:300]}")
            return None
        view: dict[str, Any] = response.json()
        run_id = str(view["run_id"])
        with self.book.lock:
            first = self.book.run_ids.setdefault(key, run_id)
        if first != run_id:
            self._anomaly(f"{kind} {key}: answered with run {run_id}, earlier with {first}")
        return view

    def _anomaly(self, text: str) -> None:
        with self.book.lock:
            self.book.anomalies.append(text)


def _close_sockets_of(exc: BaseException) -> None:
    """Close the sockets the failed request's frames hold. httpcore leaves the socket of
    a failed Unix-socket connect (the daemon just killed) to the garbage collector, which
    then warns (ResourceWarning); a POS that retries through hundreds of kills would
    leave hundreds."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, socket.socket):
                    value.close()
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
