"""Steps of the terminal's refund, void and settlement workflows
(``workflows/refund.yaml``, ``void.yaml``, ``settlement.yaml``).

They use the same ``ctx.services`` (a ``TerminalServices``) as the payment's steps
(``payment_steps``): ports (``card_reader``, ``printer``, ``acquirer``, ``link``),
``data_key``, ``store`` (run lookup, counters, outbox), ``device_id``.

Each workflow has a strict state model (below): a run's input is checked at
``Engine.start`` (an InputError names the field), and every step sees a typed state.

Counters (guards, checked in the committing transaction; see ``ctx.guard``):

``void:<payment run>``     count 0/1: the payment is voided (or a void of it is under way).
``refund:<payment run>``   amount refunded against the payment (refunds that name it).
``settlement:last_seq``    amount = outbox seq the last settlement covers; count = batches.

A void and a refund of the same payment each check the other's counter with a zero-change
guard in the same commit that claims their own, so they cannot both win a race. Both
touch ``void:`` before ``refund:``: one lock order, so PostgreSQL cannot deadlock them.
These counters are never pruned: one or two small rows per voided or refunded payment.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.engine import Status, StepContext, Store
from edge.engine.ports import Maintenance, OutboxSource
from edge.errors import StepError
from edge.terminal.carddata import Sensitive
from edge.terminal.drivers.contracts import (
    AcquirerError,
    AcquirerUnavailable,
    AuthRequest,
    PaperOut,
)
from edge.terminal.sale import payment_steps, risk
from edge.terminal.sale.services import TerminalServices

State = dict[str, Any]

#: Topics a settlement totals, i.e. the kinds of transaction message.
KINDS: tuple[str, ...] = ("payment", "refund", "void")
SETTLEMENT_COUNTER = "settlement:last_seq"
_OUTBOX_PAGE = 500

# Machine-readable decline reasons (the API returns them as they are).
UNKNOWN_PAYMENT = "unknown_payment"
NOT_A_PAYMENT = "not_a_payment"
PAYMENT_NOT_COMPLETED = "payment_not_completed"
PAYMENT_NOT_APPROVED = "payment_not_approved"
OTHER_TERMINAL = "other_terminal"
ALREADY_VOIDED = "already_voided"
PAYMENT_VOIDED = "payment_voided"
PAYMENT_REFUNDED = "payment_refunded"
OFFLINE_PAYMENT_UPLOADED = "offline_payment_uploaded"
PAYMENT_NOT_REVERSIBLE = "payment_not_reversible"
OFFLINE_REFUND_NOT_ALLOWED = "offline_refund_not_allowed"
OFFLINE_VOID_NOT_ALLOWED = "offline_void_not_allowed"
REFUND_EXCEEDS_PAYMENT = "refund_exceeds_payment"
CURRENCY_MISMATCH = "currency_mismatch"
CARD_MISMATCH = "card_mismatch"
ACQUIRER_UNAVAILABLE = "acquirer_unavailable"
ACQUIRER_ERROR = "acquirer_error"
REFUND_OUTCOME_UNKNOWN = "refund_outcome_unknown"


class RefundIrreversible(StepError):
    """The saga reached an approved refund: it cannot be undone, so the run ends FAILED
    (with the refund recorded) instead of pretending to have rolled back."""

    code = "refund_irreversible"


# --- state models ------------------------------------------------------------------------


class _State(BaseModel):
    # defer_build: built by the first refund or void, not when the daemon starts.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


Decision = Literal["approved", "declined", "unknown"]


class RefundState(_State):
    amount_minor: int = Field(gt=0, le=100_000_000)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    #: The payment refunded, if the POS names it: then the refund is checked against it.
    original_run_id: str | None = Field(None, min_length=1, max_length=64)
    card: dict[str, Any] | None = None  # a ProtectedCard dump: never the clear PAN
    decision: Decision | None = None
    reason: str | None = None
    acquirer_reason: str | None = None
    auth_code: str | None = None
    acquirer_ref: str | None = None
    #: The key the acquirer knows the refund by (for reconciliation of an unknown outcome).
    refund_key: str | None = None
    #: Amount claimed on ``refund:<original_run_id>``.
    claimed_minor: int = 0
    message_id: str | None = None
    printer: Literal["printed", "paper_out"] | None = None


class VoidState(_State):
    payment_run_id: str = Field(min_length=1, max_length=64)
    decision: Decision | None = None
    reason: str | None = None
    amount_minor: int | None = None
    currency: str | None = None
    offline: bool = False
    masked_pan: str | None = None
    auth_key: str | None = None
    payment_auth_code: str | None = None
    void_claimed: bool = False
    reversed: bool = False
    released: bool = False
    acquirer_reason: str | None = None
    acquirer_ref: str | None = None
    message_id: str | None = None


class SettlementState(_State):
    business_day: str | None = Field(None, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
    batch_no: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    through_seq: int | None = None
    totals: dict[str, Any] | None = None
    net_minor: dict[str, int] | None = None
    skipped: dict[str, int] | None = None
    gap: list[int] | None = None
    message_id: str | None = None

    @field_validator("business_day")
    @classmethod
    def _is_a_date(cls, value: str | None) -> str | None:
        if value is not None:
            dt.date.fromisoformat(value)  # ValueError names an impossible date (2026-02-30)
        return value


# --- shared helpers ------------------------------------------------------------------------


def _declined(reason: str, **more: Any) -> State:
    return {"decision": "declined", "reason": reason, **more}


class _TerminalStore(Store, OutboxSource, Maintenance, Protocol):
    """The store as the void and settlement steps read it: runs, the outbox, counters."""


def _store(ctx: StepContext) -> _TerminalStore:
    store: _TerminalStore = ctx.services.store
    return store


def _void_counter(payment_run_id: str) -> str:
    return f"void:{payment_run_id}"


def _refund_counter(payment_run_id: str) -> str:
    return f"refund:{payment_run_id}"


def payment_of_this_terminal(
    ctx: StepContext, run_id: str
) -> tuple[State, None] | tuple[None, str]:
    """The state of a COMPLETED, approved ``payment`` run of this terminal, or the reason
    it is not one. A payment state that names another device is refused; the payment
    workflow does not stamp one today (its runs are in this terminal's own database)."""
    run = _store(ctx).get_run(run_id)
    if run is None:
        return None, UNKNOWN_PAYMENT
    if run.workflow_type != "payment":
        return None, NOT_A_PAYMENT
    if run.status is not Status.COMPLETED:
        return None, PAYMENT_NOT_COMPLETED
    state = run.state
    if state.get("decision") != "approved":
        return None, PAYMENT_NOT_APPROVED
    owner = state.get("device_id")
    if owner is not None and owner != ctx.services.device_id:
        return None, OTHER_TERMINAL
    return state, None


def _pending_in_outbox(store: _TerminalStore, run_id: str, topic: str) -> bool:
    """Whether the message ``topic`` of ``run_id`` is still in the outbox (not acked)."""
    after = 0
    while True:
        page = store.outbox(after_seq=after, limit=_OUTBOX_PAGE)
        for msg in page:
            if msg.run_id == run_id and msg.topic == topic:
                return True
        if len(page) < _OUTBOX_PAGE:
            return False
        after = page[-1].seq or after


def _counter(ctx: StepContext, name: str) -> tuple[int, int]:
    return _store(ctx).counters().get(name, (0, 0))


# --- refund --------------------------------------------------------------------------------


def read_card(state: RefundState, ctx: StepContext) -> State:
    """The payment's card read: protected at once, Luhn and expiry checked."""
    return payment_steps.read_card({}, ctx)


def check_original(state: RefundState, ctx: StepContext) -> State:
    """When the refund names a payment: same card, same currency, not voided, and the
    refunds against it stay within its amount, claimed on ``refund:<id>`` in this commit
    (the claim is given back if the refund does not go through). Refunds are online
    only: with the link down the refund is declined here, before anything is sent (a
    replay of authorize_refund cannot tell whether its request reached the acquirer)."""
    if state.decision == "declined":
        return {}
    if not ctx.services.link.is_up():
        return _declined(OFFLINE_REFUND_NOT_ALLOWED)
    if state.original_run_id is None:
        return {}
    original = state.original_run_id
    payment, reason = payment_of_this_terminal(ctx, original)
    if payment is None:
        return _declined(reason or UNKNOWN_PAYMENT)
    if payment.get("currency") != state.currency:
        return _declined(CURRENCY_MISMATCH)
    if (payment.get("card") or {}).get("pan_hash") != (state.card or {}).get("pan_hash"):
        return _declined(CARD_MISMATCH)
    if _counter(ctx, _void_counter(original))[1] > 0:
        return _declined(PAYMENT_VOIDED)
    cap = int(payment["amount_minor"])
    if _counter(ctx, _refund_counter(original))[0] + state.amount_minor > cap:
        return _declined(REFUND_EXCEEDS_PAYMENT)
    ctx.guard(_void_counter(original), max_count=0, reason=PAYMENT_VOIDED)
    ctx.guard(
        _refund_counter(original),
        amount=state.amount_minor,
        count=1,
        max_amount=cap,
        reason=REFUND_EXCEEDS_PAYMENT,
    )
    return {"claimed_minor": state.amount_minor}


def _give_back_refund_claim(state: RefundState, ctx: StepContext) -> State:
    if state.original_run_id is None or state.claimed_minor <= 0:
        return {}
    ctx.guard(
        _refund_counter(state.original_run_id),
        amount=-state.claimed_minor,
        count=-1,
        reason="refund_claim_release",
    )
    return {"claimed_minor": 0}


def release_original(state: RefundState, ctx: StepContext) -> State:
    """Compensation of ``check_original``: give the claim back, unless money may have
    moved (an approved or unknown refund keeps its claim)."""
    if state.decision in ("approved", "unknown"):
        return {}
    return _give_back_refund_claim(state, ctx)


def authorize_refund(state: RefundState, ctx: StepContext) -> State:
    """Online only. The acquirer's idempotency key is this attempt's key: the step has
    no retries, so a crash-replay presents the same key and gets the first answer, and
    no second key can ever refund twice. An outcome the terminal cannot know (a timeout
    after sending) is recorded as ``unknown`` with its key, for the cloud to reconcile."""
    s: TerminalServices = ctx.services
    card = state.card or {}
    req = AuthRequest(
        pan=Sensitive(s.data_key.decrypt_pan(card["pan_token"])),
        expiry=card["expiry"],
        amount_minor=state.amount_minor,
        currency=state.currency,
        idempotency_key=ctx.idempotency_key,
        terminal_id=str(s.device_id),
    )
    key = {"refund_key": ctx.idempotency_key}
    try:
        answer = s.acquirer.refund(req)
    except AcquirerUnavailable:
        # Even "not sent" (link down, no connection) is unknown here: this may be a
        # replay after a crash whose first request reached the acquirer and refunded.
        return {"decision": "unknown", "reason": REFUND_OUTCOME_UNKNOWN, **key}
    except AcquirerError as exc:  # an error answer: the acquirer did not refund
        return {
            **_declined(ACQUIRER_ERROR, acquirer_reason=exc.message),
            **_give_back_refund_claim(state, ctx),
        }
    if not answer.approved:
        return {
            **_declined("acquirer", acquirer_reason=answer.reason),
            **_give_back_refund_claim(state, ctx),
        }
    return {
        "decision": "approved",
        "auth_code": answer.auth_code,
        "acquirer_ref": answer.acquirer_ref,
        **key,
    }


def refund_is_final(state: RefundState, ctx: StepContext) -> State:
    """Compensation of ``authorize_refund``: nothing to undo for a declined refund; an
    approved (or unknown) one cannot be reversed, so the compensation fails for good and
    the run ends FAILED, naming the uncompensated steps. The refund is already in the
    outbox (``record`` runs before the receipt is printed)."""
    if state.decision not in ("approved", "unknown"):
        return {}
    raise RefundIrreversible(
        f"refund of {state.amount_minor} {state.currency} was {state.decision} at the "
        f"acquirer (key {state.refund_key}) and is recorded (message {state.message_id}); "
        "a refund cannot be reversed",
        retryable=False,
        hint="the customer was refunded: reprint the receipt, do not refund again",
    )


def record_refund(state: RefundState, ctx: StepContext) -> State:
    """The refund message for the cloud, whatever the outcome, in this step's commit."""
    card = state.card or {}
    message_id = ctx.emit(
        "refund",
        {
            "device_id": ctx.services.device_id,
            "run_id": ctx.run_id,
            "amount_minor": state.amount_minor,
            "currency": state.currency,
            "decision": state.decision or "declined",
            "reason": state.reason,
            "original_run_id": state.original_run_id,
            "auth_code": state.auth_code,
            "acquirer_ref": state.acquirer_ref,
            "acquirer_reason": state.acquirer_reason,
            "refund_key": state.refund_key,
            "masked_pan": card.get("masked"),
            "pan_token": card.get("pan_token"),
        },
    )
    return {"message_id": message_id}


def print_refund_receipt(state: RefundState, ctx: StepContext) -> State:
    card = state.card or {}
    lines = [
        f"TERMINAL {ctx.services.device_id}",
        f"CARD {card.get('masked')}",
        f"REFUND {state.amount_minor / 100:.2f} {state.currency}",
        f"APPROVED {state.auth_code or ''}",
    ]
    try:
        ctx.services.printer.print_receipt(lines)
    except PaperOut:
        return {"printer": "paper_out"}  # the workflow waits for an operator
    return {"printer": "printed"}


# --- void ----------------------------------------------------------------------------------


def load_payment(state: VoidState, ctx: StepContext) -> State:
    """Check the payment may be voided and claim the void (``void:<id>``, at most once)
    in this commit: of two concurrent voids, the second's commit is refused, it runs
    again, and declines ``already_voided``."""
    pid = state.payment_run_id
    payment, reason = payment_of_this_terminal(ctx, pid)
    if payment is None:
        return _declined(reason or UNKNOWN_PAYMENT)
    card = payment.get("card") or {}
    facts: State = {
        "amount_minor": payment.get("amount_minor"),
        "currency": payment.get("currency"),
        "offline": bool(payment.get("offline")),
        "masked_pan": card.get("masked"),
        "auth_key": payment.get("auth_key"),
        "payment_auth_code": payment.get("auth_code"),
    }
    if _counter(ctx, _void_counter(pid))[1] > 0:
        return _declined(ALREADY_VOIDED, **facts)
    if _counter(ctx, _refund_counter(pid))[0] > 0:
        return _declined(PAYMENT_REFUNDED, **facts)
    if facts["offline"]:
        # Never sent: the terminal still holds it, so the void is local. Once the cloud
        # has acknowledged it, it is the acquirer's: refund it instead.
        if not _pending_in_outbox(_store(ctx), pid, "payment"):
            return _declined(OFFLINE_PAYMENT_UPLOADED, **facts)
    elif not facts["auth_key"]:
        return _declined(PAYMENT_NOT_REVERSIBLE, **facts)
    elif not ctx.services.link.is_up():
        # Decided here, before anything is sent: once reverse_payment has run, a replay
        # of it (after a crash) cannot tell whether its reversal reached the acquirer.
        return _declined(OFFLINE_VOID_NOT_ALLOWED, **facts)
    ctx.guard(_void_counter(pid), count=1, max_count=1, reason=ALREADY_VOIDED)
    ctx.guard(_refund_counter(pid), max_amount=0, reason=PAYMENT_REFUNDED)
    return {**facts, "void_claimed": True}


def _give_back_void_claim(state: VoidState, ctx: StepContext) -> State:
    if not state.void_claimed:
        return {}
    ctx.guard(_void_counter(state.payment_run_id), count=-1, reason="void_claim_release")
    return {"void_claimed": False}


def release_void_claim(state: VoidState, ctx: StepContext) -> State:
    """Compensation of ``load_payment``: the void did not happen, so another may try.
    A reversal the acquirer approved cannot be undone: then the claim stays."""
    if state.reversed:
        return {}
    return _give_back_void_claim(state, ctx)


def reverse_payment(state: VoidState, ctx: StepContext) -> State:
    """Reverse the online authorisation. Reversals are idempotent by the original key at
    the acquirer, so a retry under a new attempt key cannot reverse twice."""
    s: TerminalServices = ctx.services
    # No decline for a link that went down since load_payment: this may be a replay of
    # a reversal whose answer was lost (the daemon killed, a timeout), which the
    # acquirer may have applied. A decline would tell the POS "not voided" of a payment
    # the acquirer released. Retry instead: reversals are idempotent by original key.
    if not state.auth_key:  # load_payment declined such a void: not reached
        raise StepError("the payment has no authorisation key to reverse", retryable=False)
    try:
        answer = s.acquirer.reverse(state.auth_key, ctx.idempotency_key)
    except AcquirerUnavailable as exc:
        raise StepError(f"acquirer unavailable: {exc.message}") from exc
    except AcquirerError as exc:
        raise StepError(f"acquirer error: {exc.message}", retryable=exc.retryable) from exc
    if not answer.approved:
        return {
            **_declined("acquirer", acquirer_reason=answer.reason),
            **_give_back_void_claim(state, ctx),
        }
    return {
        "decision": "approved",
        "reversed": True,
        "acquirer_reason": answer.reason,  # e.g. already_reversed: approved, no 2nd effect
        "acquirer_ref": answer.acquirer_ref,
    }


def release_offline(state: VoidState, ctx: StepContext) -> State:
    """An offline payment never left the terminal: give its room under the offline caps
    back (the acquirer never saw it, so there is nothing to call).

    If the cloud acknowledged the payment since ``load_payment`` looked (its exposure
    went back with the acknowledgement, which took the release marker), the payment is
    the acquirer's now: the void is declined as ``load_payment`` would have, and its
    claim given back. The marker makes that exact: of the acknowledgement and this
    commit, the second is refused, and this step runs again and sees it."""
    pid = state.payment_run_id
    released = _counter(ctx, risk.released_marker(pid))[1] > 0
    if not risk.release(
        ctx, payment_run_id=pid, amount_minor=int(state.amount_minor or 0), released=released
    ):
        return {**_declined(OFFLINE_PAYMENT_UPLOADED), **_give_back_void_claim(state, ctx)}
    return {"decision": "approved", "released": True}


def restore_offline(state: VoidState, ctx: StepContext) -> State:
    """Compensation of ``release_offline``: the payment stands again, and so does its
    exposure (no cap: it was already approved)."""
    if not state.released:
        return {}
    risk.restore(
        ctx, payment_run_id=state.payment_run_id, amount_minor=int(state.amount_minor or 0)
    )
    return {"released": False, "decision": None}


def record_void(state: VoidState, ctx: StepContext) -> State:
    message_id = ctx.emit(
        "void",
        {
            "device_id": ctx.services.device_id,
            "run_id": ctx.run_id,
            "payment_run_id": state.payment_run_id,
            "amount_minor": state.amount_minor,
            "currency": state.currency,
            "decision": state.decision or "declined",
            "reason": state.reason,
            "offline": state.offline,
            "payment_auth_code": state.payment_auth_code,
            "acquirer_ref": state.acquirer_ref,
            "acquirer_reason": state.acquirer_reason,
            "masked_pan": state.masked_pan,
        },
    )
    return {"message_id": message_id}


# --- settlement ----------------------------------------------------------------------------


def settle(state: SettlementState, ctx: StepContext) -> State:
    """Total the transaction messages after the last settled outbox seq, emit one
    ``settlement`` message, and move ``settlement:last_seq`` forward in the same commit.

    The counter moves by compare-and-set, as a guard: ``amount`` (last seq) may not pass
    the new seq and ``count`` (batches) may not pass the next batch number, i.e. nobody
    settled since this step read them. A concurrent settlement that committed first makes
    this commit refused; the step runs again from the new seq. So every message is in
    exactly one batch.
    """
    s: TerminalServices = ctx.services
    store = _store(ctx)
    device_id = str(s.device_id)
    last, batches = store.counters().get(SETTLEMENT_COUNTER, (0, 0))
    totals: dict[str, dict[str, dict[str, int]]] = {}
    skipped: dict[str, int] = {}
    first_seq: int | None = None
    last_seq: int | None = None
    first_present: int | None = None
    through = after = last
    while True:
        page = store.outbox(after_seq=after, limit=_OUTBOX_PAGE)
        for msg in page:
            seq = int(msg.seq or 0)
            after = through = max(through, seq)
            first_present = seq if first_present is None else first_present
            payload = msg.payload if isinstance(msg.payload, dict) else {}
            if msg.topic not in KINDS or payload.get("device_id", device_id) != device_id:
                continue
            decision = str(payload.get("decision"))
            if decision != "approved":
                skipped[decision] = skipped.get(decision, 0) + 1
                continue
            per_kind = totals.setdefault(
                str(payload["currency"]),
                {k: {"count": 0, "amount_minor": 0} for k in KINDS},
            )
            per_kind[msg.topic]["count"] += 1
            per_kind[msg.topic]["amount_minor"] += int(payload["amount_minor"])
            first_seq = seq if first_seq is None else first_seq
            last_seq = seq
        if len(page) < _OUTBOX_PAGE:
            break
    net = {
        cur: k["payment"]["amount_minor"] - k["refund"]["amount_minor"] - k["void"]["amount_minor"]
        for cur, k in totals.items()
    }
    # Messages acknowledged (deleted) before a settlement read them are not in any batch:
    # say which seqs are missing, for the cloud (which has them) to add.
    gap = [last + 1, first_present - 1] if first_present and first_present > last + 1 else None
    business_day = state.business_day or (
        dt.datetime.fromtimestamp(ctx.clock.now()).date().isoformat()  # the terminal's day
    )
    batch_no = batches + 1
    ctx.guard(
        SETTLEMENT_COUNTER,
        amount=through - last,
        count=1,
        max_amount=through,
        max_count=batch_no,
        reason="settlement_raced",
    )
    result: State = {
        "business_day": business_day,
        "batch_no": batch_no,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "through_seq": through,
        "totals": totals,
        "net_minor": net,
        "skipped": skipped,
        "gap": gap,
    }
    message_id = ctx.emit("settlement", {"device_id": device_id, "run_id": ctx.run_id, **result})
    return {**result, "message_id": message_id}
