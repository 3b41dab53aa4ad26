"""Steps of ``cloud/workflows/resolve_outcome.yaml``: look an unknown outcome up at the
acquirer, then record the truth and tell the terminal, together.

``ctx.services`` holds an ``OutcomeServices`` (itself, or as ``.outcomes`` /
``["outcomes"]`` of the cloud engine's services): a connection factory for the
control plane's database, the acquirer port, the command-signing key; or the cloud
engine's usual services it is made of (``_services``).

Exactly once: ``look_up`` changes nothing anywhere (ask as often as you like);
``record_and_tell`` changes the outcome's row from open to resolved and queues the
command in ONE transaction, under the row's lock, so a replay (a worker killed after
the commit, before the engine recorded the step) finds the row resolved and queues
nothing again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.types.json import Jsonb

from cloud.outcomes._sql import Conn, Q
from cloud.outcomes.acquirer import (
    AcquirerLookup,
    AcquirerUnreachable,
    HttpAcquirerLookup,
    Lookup,
    LookupFailed,
)
from cloud.outcomes.command import DEFAULT_TTL_S, queue_resolution
from cloud.settings import CloudSettings
from cloud.stepservices import service
from cloud.sync.keys import load_key
from edge.engine import StepContext
from edge.errors import ConfigError, StepError
from sync import wire

log = logging.getLogger(__name__)

State = dict[str, Any]

#: The acquirer's operation each kind of outcome must be.
_ACQUIRER_OPERATION = {"authorization": "authorize", "refund": "refund"}


@dataclass(frozen=True)
class OutcomeServices:
    """What the resolve steps need."""

    #: A connection to the control plane's database, for the outcomes' and the sync
    #: service's tables, with tuple rows (the sync backend's ``pool.connection``, or
    #: ``lambda: psycopg.connect(url)``).
    connect: Callable[[], AbstractContextManager[Conn]]
    acquirer: AcquirerLookup
    signing_key: Ed25519PrivateKey
    command_ttl_s: float = DEFAULT_TTL_S


def _services(ctx: StepContext) -> OutcomeServices:
    """The ``OutcomeServices`` given (``ctx.services`` itself, or its ``outcomes``), else
    one made of the cloud engine's usual services: ``pool`` (else a connection of its
    own to ``settings.database_url``), ``signing_key`` (else the key file
    ``settings.key_path()``), and ``acquirer_lookup`` (an ``AcquirerLookup``; else an
    HTTP one for ``settings.acquirer_url``, when the settings have that field). Missing
    pieces are a retryable failure: the run waits, open and listed, until a worker that
    has them takes it."""
    for found in (ctx.services, service(ctx, "outcomes")):
        if isinstance(found, OutcomeServices):
            return found
    settings = service(ctx, "settings")
    acquirer = service(ctx, "acquirer_lookup")
    url = getattr(settings, "acquirer_url", None)
    if acquirer is None and isinstance(url, str) and url:
        acquirer = _http_lookup(url)
    if acquirer is None:
        raise StepError(
            "no acquirer to ask: the engine's services have no outcomes or acquirer_lookup",
            retryable=True,
            hint="give the cloud engine OutcomeServices (services.outcomes), or an "
            "acquirer_lookup, or settings.acquirer_url",
        )
    key = service(ctx, "signing_key")
    if not isinstance(key, Ed25519PrivateKey):
        if not isinstance(settings, CloudSettings):
            raise StepError("no signing key and no settings to find one", retryable=True)
        try:
            key = load_key(settings.key_path())
        except ConfigError as exc:
            raise StepError(f"cannot sign: {exc}", retryable=True, hint=exc.hint) from exc
    return OutcomeServices(connect=_connector(ctx, settings), acquirer=acquirer, signing_key=key)


_lookups: dict[str, HttpAcquirerLookup] = {}


def _http_lookup(url: str) -> HttpAcquirerLookup:
    """One pooled client per acquirer URL, per process."""
    found = _lookups.get(url)
    if found is None:
        found = _lookups.setdefault(url, HttpAcquirerLookup(url))
    return found


def _connector(ctx: StepContext, settings: Any) -> Callable[[], AbstractContextManager[Conn]]:
    pool = service(ctx, "pool")
    if pool is not None:
        return pool.connection  # type: ignore[no-any-return]
    url = getattr(settings, "database_url", None)
    if not url:
        raise StepError("no pool and no database_url in the settings", retryable=True)
    return lambda: psycopg.connect(url, connect_timeout=10)


def look_up(state: State, ctx: StepContext) -> State:
    """Ask the acquirer what became of the operation under ``key``. Away (no connection,
    a 5xx): a retryable failure, so the engine asks again after its backoff, durably,
    for as long as the YAML's retry says. Refused, or an answer about another kind of
    operation: a failure for good (the outcome stays open, listed by the API)."""
    svc = _services(ctx)
    key = str(state["key"])
    try:
        found: Lookup = svc.acquirer.lookup(key)
    except AcquirerUnreachable as exc:
        raise StepError(f"lookup of {key}: {exc.message}", retryable=True) from exc
    except LookupFailed as exc:
        raise StepError(f"lookup of {key}: {exc.message}", retryable=False) from exc
    wanted = _ACQUIRER_OPERATION[str(state["operation"])]
    if found.found and found.operation != wanted:
        raise StepError(
            f"the acquirer holds a {found.operation} under {key}, not a {wanted}",
            retryable=False,
        )
    return {"lookup": found.model_dump(mode="json"), "looked_up_at": ctx.clock.now()}


def record_and_tell(state: State, ctx: StepContext) -> State:
    """In one transaction: the truth on the outcome's row (open -> resolved) and the
    signed ``resolve_outcome`` command for the terminal. A row already resolved (this
    step replayed after its commit) is answered from the row."""
    svc = _services(ctx)
    found = Lookup.model_validate(state["lookup"])
    now = ctx.clock.now()
    outcome = wire.Outcome(
        operation=state["operation"],
        run_id=state["run_id"],
        key=state["key"],
        status=found.status,
        amount_minor=found.amount_minor,
        currency=found.currency,
        acquirer_ref=found.acquirer_ref,
        looked_up_at=float(state["looked_up_at"]),
    )
    with svc.connect() as conn, conn.transaction():
        row = conn.execute(Q["outcome_for_update"], {"outcome_id": state["outcome_id"]}).fetchone()
        if row is None:
            raise StepError(f"no outcome {state['outcome_id']}", retryable=False)
        if row[5] == "resolved":
            return {"status": row[6], "command_id": row[7]}
        queued = queue_resolution(
            conn,
            svc.signing_key,
            outcome,
            device_id=str(state["device_id"]),
            now=now,
            ttl_s=svc.command_ttl_s,
        )
        conn.execute(
            Q["resolve"],
            {
                "outcome_id": state["outcome_id"],
                "status": found.status,
                "acquirer_ref": found.acquirer_ref,
                "lookup": Jsonb(found.model_dump(mode="json")),
                "at": now,
                "command_id": queued.command_id,
                "command_note": queued.note,
            },
        )
    log.info(
        "outcome %s of device %s resolved: %s (command %s)",
        state["key"],
        state["device_id"],
        found.status,
        queued.command_id or queued.note,
        extra={"action": "outcome_resolved", "device_id": state["device_id"]},
    )
    return {"status": found.status, "command_id": queued.command_id, "note": queued.note}
