"""The steps of AuditAggregation (``cloud/workflows/audit_aggregation.yaml``): the
control plane's scheduled pass over every device's audit chain as the cloud holds it.

1. ``prepare``: the control tables migrated if they are not (the first run on a new
   database), the run's counters zeroed.
2. ``raise_silent``: devices not seen within ``offline_after_s`` raised, those seen again
   cleared (``cloud.control.alerts``). First, so that a refused digest below does not
   also silence the offline alerts.
3. ``check_digest``: the newest signed digest checked (hashes, chain of digests, the
   control plane's signature); a digest that fails is refused and fails the run (the
   cloud's own table was edited: an operator must look), since comparing chains with a
   forged digest would prove nothing.
4. ``verify_page`` (a loop, one page of devices per step, so 10,000 devices are 100
   committed steps, not one huge one): each device's chains re-walked and compared with
   the heads that digest signed (``cloud.control.chains``); every chain's result saved.
5. ``record_digest``: the signed digest of every chain's head as it is now. A chain this
   run found broken keeps the head the previous digest signed, so an edit is not
   laundered into the next digest: it stays found until an operator deals with it.

Every step is idempotent (a retry after a crash redoes it harmlessly): verification rows
are replaced, the digest is keyed by the run, alerts are upserts.

What the steps need, from ``ctx.services`` (an object or a mapping): ``settings``
(``CloudSettings``: ``database_url``, ``offline_after_s``, the key path); optionally
``pool`` (a psycopg_pool pool of autocommit connections with tuple rows; else each step
opens one connection of its own) and ``signing_key`` (else read from
``settings.key_path()``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.control import Conn, migrate
from cloud.control import alerts as alerts_
from cloud.control import digest as digests
from cloud.control._sql import Q
from cloud.control.chains import check_device
from cloud.settings import CloudSettings
from cloud.stepservices import service
from cloud.sync.keys import load_key
from edge.engine import StepContext
from edge.errors import ConfigError, StepError

log = logging.getLogger(__name__)

#: Devices verified per step: small enough that a step stays seconds long with
#: thousands of rows per device, large enough that 10,000 devices are 100 steps.
DEVICES_PER_PAGE = 100
#: Broken devices named in the run's state (the table has them all).
MAX_NAMED = 100


def _settings(ctx: StepContext) -> CloudSettings:
    settings = service(ctx, "settings")
    if not isinstance(settings, CloudSettings):
        raise StepError(
            "AuditAggregation needs the control plane's settings as ctx.services.settings",
            retryable=False,
            hint="build the engine with cloud.engine.cloud_engine (it passes them)",
        )
    return settings


@contextlib.contextmanager
def _connect(ctx: StepContext) -> Iterator[Conn]:
    """A connection for one step: from ``services.pool``, else one of its own."""
    pool = service(ctx, "pool")
    if pool is not None:
        with pool.connection() as conn:
            yield conn
        return
    url = _settings(ctx).database_url
    if not url:
        raise StepError("no database_url in the control plane's settings", retryable=False)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        yield conn


def _signing_key(ctx: StepContext) -> Ed25519PrivateKey:
    key = service(ctx, "signing_key")
    if isinstance(key, Ed25519PrivateKey):
        return key
    try:
        return load_key(_settings(ctx).key_path())
    except ConfigError as exc:
        raise StepError(f"cannot sign the digest: {exc}", retryable=False, hint=exc.hint) from exc


def _page_size(ctx: StepContext) -> int:
    size = ctx.input.get("page_size") if isinstance(ctx.input, Mapping) else None
    if isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 10_000:
        return size
    return DEVICES_PER_PAGE


# --- the steps ---------------------------------------------------------------------------


def prepare(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    with _connect(ctx) as conn, conn.transaction():
        version = migrate(conn)
    return {
        "control_schema": version,
        "started_at": ctx.clock.now(),
        "after": None,
        "more": True,
        "devices": 0,
        "chains": 0,
        "broken_chains": 0,
        "broken_devices": [],
    }


def raise_silent(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    settings = _settings(ctx)
    with _connect(ctx) as conn, conn.transaction():
        swept = alerts_.sweep(
            conn, now=ctx.clock.now(), offline_after_s=settings.offline_after_s,
            run_id=ctx.run_id,
        )  # fmt: skip
    for device_id in swept.raised:
        log.warning(
            "device %s has not synced for over %.0f s",
            device_id,
            settings.offline_after_s,
            extra={"action": "device_silent", "device_id": device_id, "run_id": ctx.run_id},
        )
    return {"alerts_raised": len(swept.raised), "alerts_cleared": len(swept.cleared),
            "alerts_open": swept.open}  # fmt: skip


def check_digest(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    public = _signing_key(ctx).public_key()
    with _connect(ctx) as conn, conn.transaction():
        newest = digests.latest(conn)
        if newest is None:
            return {"against_digest": None}
        _, problems = digests.verify_stored(conn, newest.seq, public)
    if problems:
        log.error(
            "audit digest %d refused: %s",
            newest.seq,
            "; ".join(problems),
            extra={"action": "audit_digest_refused", "run_id": ctx.run_id},
        )
        raise StepError(
            f"audit digest {newest.seq} refused: {'; '.join(problems)}",
            retryable=False,
            hint="the cloud's audit_digests table was changed; nothing is compared with it",
        )
    return {"against_digest": newest.seq}


def verify_page(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    against = state.get("against_digest")
    now = ctx.clock.now()
    limit = _page_size(ctx)
    chains = broken_chains = 0
    broken: list[str] = list(state.get("broken_devices") or [])
    with _connect(ctx) as conn:
        params = {"after": state.get("after"), "limit": limit}
        ids = [str(r[0]) for r in conn.execute(Q["device_page"], params)]
        for device_id in ids:
            with conn.transaction():
                signed = {}
                if against is not None:
                    signed = {
                        (h.stream, h.chain): h
                        for h in digests.heads_of(conn, int(against), device_id)
                    }
                checks = check_device(conn, device_id, signed)
                for c in checks:
                    conn.execute(
                        Q["save_verification"],
                        {
                            "device_id": c.device_id, "stream": c.stream, "chain": c.chain,
                            "ok": c.ok, "rows": c.rows, "head_seq": c.head_seq,
                            "first_bad_seq": c.first_bad_seq, "reason": c.reason,
                            "digest_seq": against, "run_id": ctx.run_id, "at": now,
                        },
                    )  # fmt: skip
            chains += len(checks)
            bad = [c for c in checks if not c.ok]
            broken_chains += len(bad)
            if bad:
                log.error(
                    "device %s: %d audit chain(s) broken, first at seq %s: %s",
                    device_id,
                    len(bad),
                    bad[0].first_bad_seq,
                    bad[0].reason,
                    extra={"action": "audit_chain_broken", "device_id": device_id,
                           "run_id": ctx.run_id},
                )  # fmt: skip
                if len(broken) < MAX_NAMED:
                    broken.append(device_id)
    return {
        "after": ids[-1] if ids else state.get("after"),
        "more": len(ids) == limit,
        "devices": int(state.get("devices", 0)) + len(ids),
        "chains": int(state.get("chains", 0)) + chains,
        "broken_chains": int(state.get("broken_chains", 0)) + broken_chains,
        "broken_devices": broken,
    }


def record_digest(state: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    key = _signing_key(ctx)
    against = state.get("against_digest")
    with _connect(ctx) as conn, conn.transaction():
        heads = digests.current_heads(conn)
        not_ok = {
            (str(r[0]), str(r[1]), int(r[2]))
            for r in conn.execute(Q["not_ok_in_run"], {"run_id": ctx.run_id})
        }
        if not_ok and against is not None:
            signed = {h.key: h for h in digests.heads_of(conn, int(against))}
            heads = [signed.get(h.key, h) if h.key in not_ok else h for h in heads]
        made, new = digests.record(conn, ctx.run_id, ctx.clock.now(), heads, key)
    if new:
        log.info(
            "audit digest %d signed over %d chain heads",
            made.seq,
            made.heads,
            extra={"action": "audit_digest_signed", "run_id": ctx.run_id},
        )
    return {"digest_seq": made.seq, "digest_hash": made.hash, "digest_heads": made.heads}


__all__ = [
    "DEVICES_PER_PAGE",
    "check_digest",
    "prepare",
    "raise_silent",
    "record_digest",
    "verify_page",
]
