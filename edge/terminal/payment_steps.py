"""Steps of the terminal's payment workflow (``workflows/payment.yaml``).

What they need comes from ``ctx.services`` (the runtime fills it; tests pass simulators):
``card_reader``, ``printer``, ``acquirer``, ``link`` (ports), ``data_key`` (DataKey),
``policy`` (CompiledPolicy or None), ``limits`` (RiskLimits), ``store`` (for counters and
the outbox's age), ``device_id`` and ``rng`` (random.Random, for online sampling).

Card data: the card is read into memory, and only its ProtectedCard (token, keyed hash,
masked PAN) enters the state. The clear PAN exists again only inside the authorisation
call, decrypted from the token; CVV, track data and PIN blocks are never stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from edge.engine import StepContext
from edge.engine.context import idempotency_key
from edge.errors import StepError
from edge.terminal import risk
from edge.terminal.carddata import Sensitive, luhn_valid
from edge.terminal.ports import AcquirerUnavailable, AuthRequest, PaperOut

State = dict[str, Any]


def _declined(reason: str, **more: Any) -> State:
    return {"decision": "declined", "reason": reason, **more}


def read_card(state: State, ctx: StepContext) -> State:
    s = ctx.services
    card = s["card_reader"].read(float(s.get("card_timeout_s", 30.0)))
    protected = s["data_key"].protect(card)
    now = dt.datetime.fromtimestamp(ctx.clock.now(), tz=dt.UTC)
    if not luhn_valid(card.pan.reveal()):
        return _declined("card_invalid", card=protected.model_dump())
    if card.expired(now.year, now.month):
        return _declined("card_expired", card=protected.model_dump())
    return {"card": protected.model_dump()}


def screen(state: State, ctx: StepContext) -> State:
    """Fraud policy, then the channel: online when the link is up and the amount, the
    policy or a random sample asks for it; else offline (within the risk limits)."""
    if state.get("decision") == "declined":
        return {}
    s, card = ctx.services, state["card"]
    room = s.get("outbox_max_messages")
    if room is not None and s["store"].outbox_stats().depth >= room:
        # A sale the cloud cannot be told about is not taken (the store would refuse
        # its record anyway, after the customer was charged).
        return _declined("outbox_full")
    policy = s.get("policy")
    reasons: list[str] = []
    wants_online = False
    if policy is not None:
        from edge.terminal.policy import Txn

        now = ctx.clock.now()
        local = dt.datetime.fromtimestamp(now)
        recent = 0
        if policy.velocity_windows:  # one window per policy (the document checks it)
            uses = risk.card_use_counter(card["pan_hash"], now, policy.velocity_windows[0])
            recent = s["store"].counters().get(uses, (0, 0))[1]
            ctx.guard(uses, count=1)  # this use counts for the next ones, with this step
        verdict = policy.evaluate(
            Txn(
                amount_minor=state["amount_minor"],
                currency=state["currency"],
                bin6=card["bin6"],
                pan_hash=card["pan_hash"],
                mcc=str(s.get("mcc", "5999")),
                local_minute=local.hour * 60 + local.minute,
                card_recent_count=recent,
            )
        )
        reasons = list(verdict.reasons)
        if verdict.action == "decline":
            return _declined("policy", policy_reasons=reasons, policy_version=verdict.version)
        wants_online = verdict.action in ("online", "review")
    limits = s["limits"]
    sampled = s["rng"].random() * 100 < limits.online_random_percent
    over_floor = state["amount_minor"] > limits.floor_limit_minor
    link_up = s["link"].is_up()
    channel = "online" if link_up and (wants_online or over_floor or sampled) else "offline"
    return {"channel": channel, "policy_reasons": reasons}


def authorization_key(ctx: StepContext) -> str:
    """One key for every attempt of this authorisation: a retry after a timeout may follow
    a request that did reach the acquirer, and must be recognised as the same payment
    (a new key per attempt could charge the card twice)."""
    return idempotency_key(ctx.run_id, ctx.step, 1)


def authorize_online(state: State, ctx: StepContext) -> State:
    s, card = ctx.services, state["card"]
    pan = s["data_key"].decrypt_pan(card["pan_token"])
    key = authorization_key(ctx)
    req = AuthRequest(
        pan=Sensitive(pan),
        expiry=card["expiry"],
        amount_minor=state["amount_minor"],
        currency=state["currency"],
        idempotency_key=key,
        terminal_id=str(s["device_id"]),
    )
    try:
        answer = s["acquirer"].authorize(req)
    except AcquirerUnavailable as exc:
        raise StepError(f"acquirer unavailable: {exc.message}") from exc
    if not answer.approved:
        return _declined("acquirer", acquirer_reason=answer.reason)
    return {
        "decision": "approved",
        "auth_code": answer.auth_code,
        "acquirer_ref": answer.acquirer_ref,
        "auth_key": key,
    }


def reverse_online(state: State, ctx: StepContext) -> State:
    if state.get("decision") != "approved" or "auth_key" not in state:
        return {}
    answer = ctx.services["acquirer"].reverse(state["auth_key"], ctx.idempotency_key)
    _record_reversal(state, ctx, "online")
    return {"reversed": bool(answer.approved), "decision": "reversed"}


def reverse_unanswered(state: State, ctx: StepContext) -> State:
    """Compensation of ``screen``: an online authorisation that never got its answer
    (the step failed for good: link down, or an answer lost to a crash or a timeout
    before the retries ran out) may still have been approved by the acquirer. Reverse
    it under its key: harmless for a key the acquirer never saw (it also refuses that
    key later), and the only thing that releases the customer's money if it did."""
    if state.get("channel") != "online" or "auth_key" in state:
        return {}  # offline, or answered (an approval is reverse_online's to undo)
    key = idempotency_key(ctx.run_id, "authorize_online", 1)  # authorization_key's
    try:
        answer = ctx.services["acquirer"].reverse(key, ctx.idempotency_key)
    except AcquirerUnavailable as exc:
        raise StepError(f"acquirer unavailable for the reversal: {exc.message}") from exc
    _record_reversal(state, ctx, "online")
    return {"reversed": bool(answer.approved), "decision": "reversed", "auth_key": key}


def _record_reversal(state: State, ctx: StepContext, channel: str) -> None:
    """The cloud hears of an undone payment too (the acquirer saw it authorised)."""
    card = state.get("card") or {}
    ctx.emit(
        "payment",
        {
            "device_id": ctx.services["device_id"],
            "run_id": ctx.run_id,
            "amount_minor": state["amount_minor"],
            "currency": state["currency"],
            "decision": "reversed",
            "channel": channel,
            "offline": channel == "offline",
            "auth_code": state.get("auth_code"),
            "masked_pan": card.get("masked"),
        },
    )


def approve_offline(state: State, ctx: StepContext) -> State:
    s, card = ctx.services, state["card"]
    store, limits, now = s["store"], s["limits"], ctx.clock.now()
    storage_high = s.get("storage_high")
    if storage_high is not None and storage_high():
        # The room left in the budget is for online sales, acknowledgements and
        # compaction: an offline sale adds to what must wait here for the cloud.
        return _declined(risk.STORAGE_FULL)
    decision = risk.check_offline(
        limits,
        amount_minor=state["amount_minor"],
        pan_hash=card["pan_hash"],
        now=now,
        counters=store.counters(),
        oldest_unsent=store.outbox_stats().oldest,
    )
    if not decision.approved:
        return _declined(decision.reason or "offline_limit")
    risk.apply_guards(
        ctx, limits, amount_minor=state["amount_minor"], pan_hash=card["pan_hash"], now=now
    )
    return {"decision": "approved", "offline": True}


def release_offline(state: State, ctx: StepContext) -> State:
    if state.get("decision") == "approved" and state.get("offline"):
        risk.release(ctx, amount_minor=state["amount_minor"])
        _record_reversal(state, ctx, "offline")
        return {"decision": "reversed"}
    return {}


def print_receipt(state: State, ctx: StepContext) -> State:
    card = state["card"]
    lines = [
        f"TERMINAL {ctx.services['device_id']}",
        f"CARD {card['masked']}",
        f"AMOUNT {state['amount_minor'] / 100:.2f} {state['currency']}",
        f"{'OFFLINE ' if state.get('offline') else ''}APPROVED {state.get('auth_code') or ''}",
    ]
    try:
        ctx.services["printer"].print_receipt(lines)
    except PaperOut:
        return {"printer": "paper_out"}  # the workflow waits for an operator
    return {"printer": "printed"}


def record(state: State, ctx: StepContext) -> State:
    """The transaction message for the cloud, in this step's transaction."""
    if state.get("reason") == "outbox_full":
        return {"recorded": False}  # no room: the audit log still has the decline
    card = state.get("card") or {}
    ctx.emit(
        "payment",
        {
            "device_id": ctx.services["device_id"],
            "run_id": ctx.run_id,
            "amount_minor": state["amount_minor"],
            "currency": state["currency"],
            "decision": state.get("decision", "approved"),
            "reason": state.get("reason"),
            "channel": state.get("channel"),
            "offline": bool(state.get("offline")),
            "auth_code": state.get("auth_code"),
            "masked_pan": card.get("masked"),
            "pan_token": card.get("pan_token"),
        },
    )
    return {"recorded": True, "device_id": ctx.services["device_id"]}
