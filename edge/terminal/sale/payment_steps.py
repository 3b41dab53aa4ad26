"""Steps of the terminal's payment workflow (``workflows/payment.yaml``).

What they need comes from ``ctx.services``, a ``TerminalServices`` (``sale/services.py``;
the runtime builds it, tests build it with simulators): the ports (``card_reader``,
``printer``, ``acquirer``, ``link``), ``data_key``, ``policy``, ``limits``, ``store`` (for
counters and the outbox's age), ``device_id`` and ``rng`` (for online sampling).

Card data: the card is read into memory, and only its ProtectedCard (token, keyed hash,
masked PAN) enters the state. The clear PAN exists again only inside the authorisation
call, decrypted from the token; CVV, track data and PIN blocks are never stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from edge.engine import StepContext
from edge.engine.context import operation_key
from edge.errors import StepError
from edge.terminal.carddata import Sensitive, luhn_valid
from edge.terminal.drivers.contracts import (
    AcquirerError,
    AcquirerUnavailable,
    AuthRequest,
    PaperOut,
)
from edge.terminal.sale import risk
from edge.terminal.sale.services import TerminalServices

State = dict[str, Any]

#: Decline reason: the acquirer could not be reached (nothing sent, and the offline
#: limits did not allow the sale; or a possible authorisation was reversed).
ACQUIRER_UNREACHABLE = "acquirer_unreachable"
#: Reason while an authorisation of unknown outcome is being reversed.
REVERSAL_PENDING = "reversal_pending"
#: Step error codes of a failed authorisation attempt (kept in its retry record).
NOT_SENT = "authorization_not_sent"
OUTCOME_UNKNOWN = "authorization_outcome_unknown"


def _declined(reason: str, **more: Any) -> State:
    return {"decision": "declined", "reason": reason, **more}


def read_card(state: State, ctx: StepContext) -> State:
    s: TerminalServices = ctx.services
    card = s.card_reader.read(s.card_timeout_s)
    protected = s.data_key.protect(card)
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
    s: TerminalServices = ctx.services
    card = state["card"]
    room = s.outbox_max_messages
    if room is not None and s.store.outbox_stats().depth >= room:
        # A sale the cloud cannot be told about is not taken (the store would refuse
        # its record anyway, after the customer was charged).
        return _declined("outbox_full")
    policy = s.policy
    reasons: list[str] = []
    wants_online = False
    if policy is not None:
        from edge.terminal.sale.policy import Txn

        now = ctx.clock.now()
        local = dt.datetime.fromtimestamp(now)
        recent = 0
        if policy.velocity_windows:  # one window per policy (the document checks it)
            uses = risk.card_use_counter(card["pan_hash"], now, policy.velocity_windows[0])
            recent = s.store.counters().get(uses, (0, 0))[1]
            ctx.guard(uses, count=1)  # this use counts for the next ones, with this step
        verdict = policy.evaluate(
            Txn(
                amount_minor=state["amount_minor"],
                currency=state["currency"],
                bin6=card["bin6"],
                pan_hash=card["pan_hash"],
                mcc=s.mcc,
                local_minute=local.hour * 60 + local.minute,
                card_recent_count=recent,
            )
        )
        reasons = list(verdict.reasons)
        if verdict.action == "decline":
            return _declined("policy", policy_reasons=reasons, policy_version=verdict.version)
        wants_online = verdict.action in ("online", "review")
    limits = s.limits
    sampled = s.rng.random() * 100 < limits.online_random_percent
    over_floor = state["amount_minor"] > limits.floor_limit_minor
    link_up = s.link.is_up()
    channel = "online" if link_up and (wants_online or over_floor or sampled) else "offline"
    return {"channel": channel, "policy_reasons": reasons}


def authorization_key(ctx: StepContext) -> str:
    """One key for every attempt of this authorisation: a retry after a timeout may follow
    a request that did reach the acquirer, and must be recognised as the same payment
    (a new key per attempt could charge the card twice). It is the step's operation key,
    whatever the YAML names the step: the engine records it with the step, so whatever
    undoes the authorisation reads it from there (or from the state this step records),
    never rebuilds it from a step name. For a step named ``authorize_online`` it is the
    key runs used before operation keys existed (``idempotency_key(run, step, 1)``)."""
    return ctx.operation_key


class AuthorizationNotSent(StepError):
    """This attempt sent nothing: the link was down or no connection was made."""

    code = NOT_SENT


class AuthorizationUnanswered(StepError):
    """The request may have reached the acquirer and been approved: no answer came back
    (a timeout, a lost connection), or this attempt replays one that died unanswered."""

    code = OUTCOME_UNKNOWN


def _nothing_ever_sent(ctx: StepContext, failure: AcquirerUnavailable) -> bool:
    """True only when no attempt of this authorisation can have reached the acquirer:
    this one sent nothing, it is no replay of an attempt that died in flight, and every
    earlier attempt failed as "not sent" (their durable retry records say so)."""
    if failure.outcome_unknown or ctx.replay:
        return False
    earlier = [
        r
        for r in ctx.services.store.step_history(ctx.run_id)
        if r.kind == "step" and r.step == ctx.step and r.status == "RETRYING"
    ]
    return all((r.error or {}).get("code") == NOT_SENT for r in earlier)


def authorize_online(state: State, ctx: StepContext) -> State:
    """Authorise under one key for all attempts. When the acquirer cannot be reached and
    no attempt is left, nothing is thrown away: if nothing was ever sent the sale is
    decided offline, within the limits (``approve_offline``); if a request may have
    arrived the outcome is ``unknown``: recorded for the cloud in this commit, and the
    run goes on to reverse it (``reverse_unknown``), never a bare failure."""
    s: TerminalServices = ctx.services
    card = state["card"]
    pan = s.data_key.decrypt_pan(card["pan_token"])
    key = authorization_key(ctx)
    req = AuthRequest(
        pan=Sensitive(pan),
        expiry=card["expiry"],
        amount_minor=state["amount_minor"],
        currency=state["currency"],
        idempotency_key=key,
        terminal_id=str(s.device_id),
    )
    try:
        answer = s.acquirer.authorize(req)
    except AcquirerUnavailable as exc:
        not_sent = _nothing_ever_sent(ctx, exc)
        if not ctx.last_attempt:
            kind = AuthorizationNotSent if not_sent else AuthorizationUnanswered
            raise kind(f"acquirer unavailable: {exc.message}") from exc
        if not_sent:
            return {"channel": "offline", "online_failed": ACQUIRER_UNREACHABLE}
        return _outcome_unknown(state, ctx, key, exc.message)
    except AcquirerError as exc:
        if exc.retryable and not ctx.last_attempt:
            raise StepError(f"acquirer error: {exc.message}") from exc
        # An error status after the request arrived (a 5xx, a broken body): the acquirer
        # may have approved before failing. Reversing an unknown key is harmless.
        return _outcome_unknown(state, ctx, key, exc.message)
    if not answer.approved:
        return _declined("acquirer", acquirer_reason=answer.reason)
    return {
        "decision": "approved",
        "auth_code": answer.auth_code,
        "acquirer_ref": answer.acquirer_ref,
        "auth_key": key,
    }


def _outcome_unknown(state: State, ctx: StepContext, key: str, why: str) -> State:
    """The authorisation may have been approved: tell the cloud now (in this commit),
    then ``reverse_unknown`` releases it, however long the acquirer stays away."""
    _emit_payment(
        state,
        ctx,
        decision="unknown",
        reason=REVERSAL_PENDING,
        channel="online",
        offline=False,
        auth_key=key,
    )
    return {
        "decision": "unknown",
        "reason": REVERSAL_PENDING,
        "acquirer_reason": why,
        "auth_key": key,
    }


def _reverse(ctx: StepContext, key: str) -> Any:
    """Reverse under ``key``; every failure is worth retrying (the step retries forever):
    money the customer may be charged is never given up on."""
    try:
        return ctx.services.acquirer.reverse(key, ctx.idempotency_key)
    except (AcquirerUnavailable, AcquirerError) as exc:
        raise StepError(f"reversal not done yet: {exc.message}", retryable=True) from exc


def _unknown_key(state: State, ctx: StepContext) -> str:
    """The key of the authorisation whose outcome is unknown: the one ``authorize_online``
    recorded in the state, else (a run in flight from a build that did not record it)
    the operation key of the step that recorded the unknown outcome."""
    if state.get("auth_key"):
        return str(state["auth_key"])
    for row in reversed(ctx.services.store.step_history(ctx.run_id)):
        output = row.output if isinstance(row.output, dict) else {}
        if row.kind == "step" and row.status == "COMPLETED" and output.get("decision") == "unknown":
            return row.operation_key or operation_key(ctx.run_id, row.step)
    raise StepError("no authorisation of unknown outcome is recorded", retryable=False)


#: Where the terminal keeps the control plane's truth about an operation whose answer it
#: lost (the sync client's ``resolve_outcome`` command stores it, one per key).
OUTCOME_DOCUMENT_PREFIX = "outcome:"
#: What the acquirer said of an authorisation that leaves no money held: nothing to
#: release, so the run ends without waiting for the acquirer to answer a reversal.
_NOTHING_HELD = ("declined", "reversed")


def _truth(ctx: StepContext, key: str) -> dict[str, Any] | None:
    """The control plane's lookup at the acquirer of the operation under ``key``, if one
    has reached this terminal."""
    found = ctx.services.store.active_document(OUTCOME_DOCUMENT_PREFIX + key)
    return found[1] if found else None


def reverse_unknown(state: State, ctx: StepContext) -> State:
    """Release an authorisation whose outcome is unknown, retried (durably, across
    restarts) until the acquirer answers. Then the sale is declined: the customer keeps
    their money, and ``record`` tells the cloud how it ended. When the control plane has
    looked the key up at the acquirer meanwhile and found it declined or already
    reversed, that truth settles the run at once (no money is held; an outage need not
    end first). Found approved, or not found (a late request could still arrive), the
    reversal goes on: it is what releases the customer, or bars the key."""
    key = _unknown_key(state, ctx)
    truth = _truth(ctx, key)
    if truth is not None and truth.get("status") in _NOTHING_HELD:
        return {
            "decision": "declined",
            "reason": ACQUIRER_UNREACHABLE,
            "reversed": truth["status"] == "reversed",
            "reversal_reason": f"acquirer_lookup_{truth['status']}",
        }
    answer = _reverse(ctx, key)
    return {
        "decision": "declined",
        "reason": ACQUIRER_UNREACHABLE,
        "reversed": bool(answer.approved),
        "reversal_reason": answer.reason,  # e.g. never_seen: nothing had arrived
    }


def reverse_online(state: State, ctx: StepContext) -> State:
    """Compensation of an approved authorisation (a later step failed for good): retried
    until the acquirer answers (``compensate_retry: forever``). It reverses under the
    compensated step's operation key (``ctx.operation_key`` here is the one recorded
    with the authorisation), the key that authorisation went under."""
    if state.get("decision") != "approved" or "auth_key" not in state:
        return {}
    answer = _reverse(ctx, ctx.operation_key)
    _record_reversal(state, ctx, "online")
    return {"reversed": bool(answer.approved), "decision": "reversed"}


def reverse_unanswered(state: State, ctx: StepContext) -> State:
    """Compensation of ``screen`` in payment version 1 only (runs started before an
    upgrade finish on it): reverse an authorisation that never got its answer."""
    if state.get("channel") != "online" or "auth_key" in state:
        return {}
    key = _unanswered_key(ctx)
    answer = _reverse(ctx, key)
    _record_reversal(state, ctx, "online")
    return {"reversed": bool(answer.approved), "decision": "reversed", "auth_key": key}


#: The authorisation step's name in payment version 1, whose definition is frozen: the
#: key of an attempt that died before any row recorded it is found under it.
_V1_AUTHORIZE = "authorize_online"


def _unanswered_key(ctx: StepContext) -> str:
    """The key of a version 1 authorisation that never got its answer: the operation key
    recorded with its last attempt (the step that failed for good), else the one its
    step name gives (version 1's YAML is frozen)."""
    for row in reversed(ctx.services.store.step_history(ctx.run_id)):
        if row.kind == "step" and row.status in ("FAILED", "RETRYING"):
            return row.operation_key or operation_key(ctx.run_id, row.step)
    return operation_key(ctx.run_id, _V1_AUTHORIZE)


def _record_reversal(state: State, ctx: StepContext, channel: str) -> None:
    """The cloud hears of an undone payment too (the acquirer saw it authorised)."""
    _emit_payment(
        state,
        ctx,
        decision="reversed",
        channel=channel,
        offline=channel == "offline",
        auth_code=state.get("auth_code"),
    )


def _emit_payment(state: State, ctx: StepContext, **fields: Any) -> None:
    """A ``payment`` message for the cloud: who, what, how much, the masked card, and
    ``fields`` (how it ended)."""
    card = state.get("card") or {}
    ctx.emit(
        "payment",
        {
            "device_id": ctx.services.device_id,
            "run_id": ctx.run_id,
            "amount_minor": state["amount_minor"],
            "currency": state["currency"],
            **fields,
            "masked_pan": card.get("masked"),
        },
    )


def approve_offline(state: State, ctx: StepContext) -> State:
    s: TerminalServices = ctx.services
    card = state["card"]
    store, limits, now = s.store, s.limits, ctx.clock.now()
    storage_high = s.storage_high
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
        reason = decision.reason or "offline_limit"
        if state.get("online_failed"):  # it wanted online: say why it could not be
            return _declined(str(state["online_failed"]), offline_reason=reason)
        return _declined(reason)
    risk.apply_guards(
        ctx, limits, amount_minor=state["amount_minor"], pan_hash=card["pan_hash"], now=now
    )
    return {"decision": "approved", "offline": True}


def release_offline(state: State, ctx: StepContext) -> State:
    if state.get("decision") == "approved" and state.get("offline"):
        store = ctx.services.store
        released = store.counters().get(risk.released_marker(ctx.run_id), (0, 0))[1] > 0
        risk.release(
            ctx, payment_run_id=ctx.run_id, amount_minor=state["amount_minor"], released=released
        )
        _record_reversal(state, ctx, "offline")
        return {"decision": "reversed"}
    return {}


def print_receipt(state: State, ctx: StepContext) -> State:
    card = state["card"]
    lines = [
        f"TERMINAL {ctx.services.device_id}",
        f"CARD {card['masked']}",
        f"AMOUNT {state['amount_minor'] / 100:.2f} {state['currency']}",
        f"{'OFFLINE ' if state.get('offline') else ''}APPROVED {state.get('auth_code') or ''}",
    ]
    try:
        ctx.services.printer.print_receipt(lines)
    except PaperOut:
        return {"printer": "paper_out"}  # the workflow waits for an operator
    return {"printer": "printed"}


def record(state: State, ctx: StepContext) -> State:
    """The transaction message for the cloud, in this step's transaction."""
    if state.get("reason") == "outbox_full":
        return {"recorded": False}  # no room: the audit log still has the decline
    _emit_payment(
        state,
        ctx,
        decision=state.get("decision", "approved"),
        reason=state.get("reason"),
        channel=state.get("channel"),
        offline=bool(state.get("offline")),
        auth_code=state.get("auth_code"),
        pan_token=(state.get("card") or {}).get("pan_token"),
        # An authorisation of unknown outcome that was reversed (reverse_unknown).
        reversed=state.get("reversed"),
    )
    return {"recorded": True, "device_id": ctx.services.device_id}
