"""A terminal assembled from its config: store, data key, policy, engine, workflows.

The peripherals are ports (``edge.terminal.drivers.contracts``): the daemon is given them (real
drivers, or ``hwsim`` simulators in tests and the demo), so nothing here imports a
simulator.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Protocol

from pydantic import ValidationError

from edge.engine import Clock, Engine, InlineExecutor, Status, SystemClock
from edge.engine.loader import load_file
from edge.engine.ports import CommandLedger, OutboxSource
from edge.engine.records import Acknowledgement, Guard, OutboxMessage
from edge.errors import StorageFull
from edge.store.sqlite import Checkpoint, CheckpointMode, SqliteStore, Storage
from edge.terminal.carddata import DataKey
from edge.terminal.config import ConfigDocument, EdgeConfig, RiskLimits, on_reload
from edge.terminal.sale import WORKFLOWS, risk
from edge.terminal.sale.services import (
    Peripherals,
    TerminalServices,
    TerminalStore,
    build_services,
)
from edge.terminal.sale.views import reversal_pending

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Health says ``full`` below this much room in the budget: a payment takes about 6 KB of
#: rows, and a transaction may need a few fresh pages (4 KB each) besides.
FULL_ROOM_BYTES = 64 * 1024
#: Live runs health looks at for pending reversals: a terminal has a handful in flight.
REVERSALS_SCANNED = 1000


def _offline_release(msg: OutboxMessage) -> tuple[Guard, ...] | None:
    """The offline exposure an outbox message holds: an offline approval's amount, let
    go when the cloud acknowledges the message (it now knows about the sale) -- unless a
    void gave it back first: the release marker goes first, and a store stops at it."""
    p = msg.payload
    if msg.topic != "payment" or not p.get("offline") or p.get("decision") != "approved":
        return None
    return risk.release_guards(str(p["run_id"]), int(p["amount_minor"]))


def offline_acknowledgement(
    store: OutboxSource, outbox_through: int, audit_through: int | None = None
) -> Acknowledgement:
    """The acknowledgement of the outbox up to ``outbox_through``, with the offline
    exposure each offline approval among those messages gives back (``_offline_release``)."""
    releases: dict[int, tuple[Guard, ...]] = {}
    after = 0
    while after < outbox_through:
        page = store.outbox(after_seq=after, limit=500)
        for msg in page:
            if msg.seq is not None and msg.seq <= outbox_through:
                released = _offline_release(msg)
                if released is not None:
                    releases[msg.seq] = released
        if not page or page[-1].seq is None:
            break
        after = page[-1].seq
    return Acknowledgement(outbox_through, audit_through, releases)


class BudgetedStore(TerminalStore, CommandLedger, Protocol):
    """A terminal's store: what the steps use, the upkeep of a database file held to a
    size budget (invariant 7), which ``maintain`` and health call, and the ledger of the
    control plane's commands, whose documents ``refresh_documents`` puts in force."""

    def storage(self) -> Storage: ...

    def reclaim(self, pages: int | None = None) -> int: ...

    def checkpoint(self, mode: CheckpointMode = "TRUNCATE") -> Checkpoint: ...


def open_store(cfg: EdgeConfig, *, vfs: str | None = None) -> SqliteStore:
    """The SQLite store ``cfg`` describes: its file, durability, outbox caps and budget."""
    return SqliteStore(
        cfg.database_path,
        synchronous=cfg.synchronous,
        outbox_max_messages=cfg.outbox_max_messages,
        outbox_max_bytes=cfg.outbox_max_mb * 1024 * 1024,
        vfs=vfs,
        max_bytes=int(cfg.db_budget_mb * MIB),
        wal_limit_bytes=int(cfg.wal_limit_mb * MIB),
    )


class Terminal:
    def __init__(
        self,
        cfg: EdgeConfig,
        peripherals: Peripherals,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        vfs: str | None = None,
        store: BudgetedStore | None = None,
    ) -> None:
        """``store``: the terminal's database; by default the SQLite store the config
        describes (``open_store``), opened through the apsw VFS ``vfs`` if one is named
        (crash tests). A store given is the terminal's from then on: ``close`` closes it."""
        self.cfg = cfg
        self.clock = clock or SystemClock()
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store: BudgetedStore = store if store is not None else open_store(cfg, vfs=vfs)
        self.last_maintenance: dict[str, Any] | None = None
        self.data_key = DataKey.load_or_create(cfg.data_dir / "keys")
        self.peripherals = peripherals
        self.last_error: str | None = None
        #: Restart-only options a reload changed: in force at the next start.
        self.restart_pending: list[str] = []
        #: The version of the config document in force (None: the file's limits alone).
        self.config_version: int | None = None
        self._compiled_documents: dict[int, Any] = {}  # policy document version -> compiled
        self._file_policy = self._load_policy()
        limits, self.policy = self._in_force()
        self.engine = Engine(
            self.store,
            # A daemon never sleeps a request thread through a backoff: recover() and the
            # main loop pick sleeping runs up when they are due.
            InlineExecutor(sleep=False),
            clock=self.clock,
            services=build_services(
                peripherals,
                store=self.store,
                data_key=self.data_key,
                limits=limits,
                device_id=cfg.device_id,
                policy=self.policy,
                card_timeout_s=cfg.peripherals.card_reader.timeout_s,
                outbox_max_messages=cfg.outbox_max_messages,
                storage_high=self.storage_high,
                rng=rng,
            ),
        )
        self.workflows = [
            self.engine.register(load_file(p)) for p in sorted(WORKFLOWS.glob("*.yaml"))
        ]

    @property
    def services(self) -> TerminalServices:
        """What the steps are handed (``ctx.services``)."""
        services: TerminalServices = self.engine.services
        return services

    def reload(self, loaded: EdgeConfig) -> list[str]:
        """SIGHUP: put ``loaded``'s live options in force (the risk limits and the policy
        for the next steps, the storage high-water mark, retention, ...) and keep the
        running value of each restart-only one (``config.reload_mode``), so that ``cfg``,
        and health, say what is enforced. Returns the restart-only options that changed,
        also in health's ``restart_pending``: they wait for the next start."""
        self.cfg, self.restart_pending = on_reload(self.cfg, loaded)
        self._file_policy = self._load_policy()
        self._put_in_force()
        return self.restart_pending

    def refresh_documents(self) -> None:
        """Take the documents the control plane's commands stored into use, as a reload
        would: the active config document's risk limits over the file's, and the active
        policy document when its version is above the file's policy. Called by the sync
        client after a command committed; at start the terminal reads them itself."""
        self._put_in_force()

    def active_policy_version(self) -> int | None:
        """The version of the fraud policy in force (file or document), or None."""
        return None if self.policy is None else int(self.policy.version)

    def _put_in_force(self) -> None:
        limits, self.policy = self._in_force()
        self.engine.services = dataclasses.replace(self.services, limits=limits, policy=self.policy)

    def _in_force(self) -> tuple[RiskLimits, Any]:
        """The risk limits and the fraud policy in force: the file's, with the stored
        documents over them (a config document's limits; a policy document of a higher
        version than the file's). A document this build cannot read is reported in
        ``last_error`` and left out, never fatal."""
        limits, policy = self.cfg.risk, self._file_policy
        self.config_version = None
        found = self.store.active_document("config")
        if found is not None:
            version, content = found
            try:
                limits = ConfigDocument.model_validate(content).with_document(limits)
                self.config_version = version
            except ValidationError as exc:
                self._document_error("config", version, exc)
        found = self.store.active_document("policy")
        if found is not None and (policy is None or found[0] > policy.version):
            version, content = found
            try:
                policy = self._compiled_document(version, content)
            except ValidationError as exc:
                self._document_error("policy", version, exc)
        return limits, policy

    def _compiled_document(self, version: int, content: dict[str, Any]) -> Any:
        from edge.terminal.sale.policy import PolicyDocument, compile_policy

        if version not in self._compiled_documents:  # a document's version never changes
            self._compiled_documents = {
                version: compile_policy(PolicyDocument.model_validate(content))
            }
        return self._compiled_documents[version]

    def _document_error(self, kind: str, version: int, exc: ValidationError) -> None:
        self.last_error = f"{kind} document version {version} is unusable: {exc.errors()[0]['msg']}"
        log.error(
            "%s document version %d is unusable, left out: %s",
            kind,
            version,
            exc,
            extra={"action": "document_unusable"},
        )

    def _load_policy(self) -> Any:
        if self.cfg.policy_file is None:
            return None
        from edge.terminal.sale.policy import PolicyRepository, load_policy_file

        repo = PolicyRepository(self.cfg.data_dir / "policies")
        doc = load_policy_file(self.cfg.policy_file)
        active = repo.active()
        if active is None or active.version < doc.version:
            return repo.activate(doc)
        return active

    def start(self) -> list[str]:
        """After a crash: resume every run that was in flight."""
        recovered = self.engine.recover()
        if recovered:
            log.info("recovered %d run(s)", len(recovered), extra={"action": "recovered"})
        return recovered

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        """The cloud holds the outbox up to ``outbox_through`` (and the audit log up to
        ``audit_through``): drop those messages and, in the same transaction, release the
        offline exposure of the offline approvals among them. Returns messages dropped.

        The releases are worked out per message beforehand; the store applies those of
        the messages its transaction really removes, so a repeated or raced
        acknowledgement releases nothing twice, and each goes behind the payment's
        release marker, so a payment voided first is not released again."""
        ack = offline_acknowledgement(self.store, outbox_through, audit_through)
        return self.store.acknowledge(ack).messages

    # --- storage (invariant 7: the database stays within its budget) ---------------

    def storage_high(self, st: Storage | None = None) -> bool:
        """Above the high-water mark: offline sales are declined (``storage_full``) so the
        room left goes to online sales, acknowledgements and compaction."""
        used = (st or self.store.storage()).used_bytes
        return used >= self.cfg.db_budget_mb * MIB * self.cfg.storage_high_water_percent / 100

    def storage(self) -> dict[str, Any]:
        st = self.store.storage()
        budget = int(self.cfg.db_budget_mb * MIB)
        used_percent = round(100 * st.used_bytes / budget, 1)
        state = "high_water" if self.storage_high(st) else "ok"
        room = budget - st.used_bytes
        if room < FULL_ROOM_BYTES:
            state = "full"  # less room than a few payments take: expect storage_full
        last = self.last_maintenance or {}
        return {
            "state": state,
            "used_bytes": st.used_bytes,
            "file_bytes": st.file_bytes,
            "budget_bytes": budget,
            "used_percent": used_percent,
            "high_water_percent": self.cfg.storage_high_water_percent,
            "wal_bytes": st.wal_bytes,
            "wal_limit_bytes": st.wal_limit_bytes,
            # A reader holding an old snapshot keeps the WAL from being reset: say so.
            "wal_over_limit": st.wal_bytes > st.wal_limit_bytes,
            "checkpoint_blocked": bool(last.get("checkpoint_busy", False)),
            "last_maintenance_at": last.get("at"),
        }

    def _longest_window(self) -> int:
        """Velocity counters live this long: the risk limits' window or the policy's."""
        windows = getattr(self.policy, "velocity_windows", ()) or ()
        return int(max([self.cfg.risk.velocity_window_s, *windows]))

    def maintain(self) -> dict[str, Any]:
        """One maintenance pass: retention, then give freed pages back, then fold the WAL
        in. Run by the daemon every ``maintenance_interval_s``; safe to run any time."""
        now = self.clock.now()
        done: dict[str, Any] = {"at": now}
        try:
            compacted = self.store.compact(
                before=now - self.cfg.retention_hours * 3600,
                counter_prefix="velocity:",
                counters_before=now - 2 * self._longest_window(),
            )
            done["compacted"] = dataclasses.asdict(compacted)
            done["reclaimed_pages"] = self.store.reclaim()
        except StorageFull as exc:  # no room even to delete: report, keep serving
            self.last_error = f"{exc.code}: {exc.message}"
            done["error"] = exc.code
        # TRUNCATE resets the WAL to empty unless a reader holds an older snapshot; then
        # it folds in what it can, and the next pass (or the stop) catches up.
        ckpt = self.store.checkpoint("TRUNCATE")
        done["checkpoint_busy"] = ckpt.busy
        done["wal_frames_left"] = ckpt.wal_frames - ckpt.checkpointed
        if ckpt.busy:
            log.warning(
                "checkpoint blocked by a reader; WAL %d frames, %d folded in",
                ckpt.wal_frames,
                ckpt.checkpointed,
                extra={"action": "checkpoint_blocked"},
            )
        self.last_maintenance = done
        log.info("maintenance: %s", done, extra={"action": "maintenance"})
        return done

    def health(self) -> dict[str, Any]:
        stats = self.store.outbox_stats()
        now = self.clock.now()
        storage = self.storage()
        amount, count = self.store.counters().get("offline", (0, 0))
        return {
            "device_id": self.cfg.device_id,
            "db_bytes": storage["file_bytes"] + storage["wal_bytes"],
            "db_budget_bytes": storage["budget_bytes"],
            "storage": storage,
            "outbox_depth": stats.depth,
            "outbox_bytes": stats.bytes,
            "outbox_max_messages": self.cfg.outbox_max_messages,
            "outbox_oldest_age_s": None if stats.oldest is None else round(now - stats.oldest, 3),
            "offline_exposure_minor": amount,
            "offline_count": count,
            # Runs retrying a reversal (an authorisation with no answer, a void): money
            # may be held until the acquirer answers; more than a few means a long outage.
            "reversals_pending": self._reversals_pending(),
            "policy_version": self.active_policy_version(),
            # The control plane's config document in force (None: the file's limits).
            "config_version": self.config_version,
            "link_up": self.peripherals.link.is_up(),
            "last_error": self.last_error,
            "restart_pending": list(self.restart_pending),
        }

    def _reversals_pending(self) -> int:
        live = self.store.list_runs([Status.RUNNING, Status.COMPENSATING], REVERSALS_SCANNED)
        return sum(1 for run in live if reversal_pending(run))

    def close(self) -> None:
        self.engine.close()
        self.store.close()
        for port in (self.peripherals.card_reader, self.peripherals.printer,
                     self.peripherals.acquirer, self.peripherals.link):  # fmt: skip
            close = getattr(port, "close", None)
            if callable(close):
                close()
