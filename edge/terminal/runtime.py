"""A terminal assembled from its config: store, data key, policy, engine, workflows.

The peripherals are ports (``edge.terminal.ports``): the daemon is given them (real
drivers, or ``hwsim`` simulators in tests and the demo), so nothing here imports a
simulator.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.engine import Clock, Engine, InlineExecutor, SystemClock
from edge.engine.loader import load_file
from edge.store.sqlite import SqliteStore
from edge.terminal.carddata import DataKey
from edge.terminal.config import EdgeConfig
from edge.terminal.ports import Acquirer, CardReader, NetworkLink, Printer

log = logging.getLogger(__name__)

WORKFLOWS = Path(__file__).with_name("workflows")


@dataclass
class Peripherals:
    card_reader: CardReader
    printer: Printer
    acquirer: Acquirer
    link: NetworkLink


class Terminal:
    def __init__(
        self,
        cfg: EdgeConfig,
        peripherals: Peripherals,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        vfs: str | None = None,
    ) -> None:
        """``vfs``: open the database through this registered apsw VFS (crash tests)."""
        self.cfg = cfg
        self.clock = clock or SystemClock()
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = SqliteStore(
            cfg.database_path,
            synchronous=cfg.synchronous,
            outbox_max_messages=cfg.outbox_max_messages,
            outbox_max_bytes=cfg.outbox_max_mb * 1024 * 1024,
            vfs=vfs,
        )
        self.data_key = DataKey.load_or_create(cfg.data_dir / "keys")
        self.policy = self._load_policy()
        self.peripherals = peripherals
        self.last_error: str | None = None
        self.engine = Engine(
            self.store,
            # A daemon never sleeps a request thread through a backoff: recover() and the
            # main loop pick sleeping runs up when they are due.
            InlineExecutor(sleep=False),
            clock=self.clock,
            services={
                "card_reader": peripherals.card_reader,
                "printer": peripherals.printer,
                "acquirer": peripherals.acquirer,
                "link": peripherals.link,
                "data_key": self.data_key,
                "policy": self.policy,
                "limits": cfg.risk,
                "store": self.store,
                "device_id": cfg.device_id,
                "card_timeout_s": cfg.peripherals.card_reader.timeout_s,
                "outbox_max_messages": cfg.outbox_max_messages,
                "rng": rng or random.Random(),
            },
        )
        self.workflows = [
            self.engine.register(load_file(p)) for p in sorted(WORKFLOWS.glob("*.yaml"))
        ]

    def _load_policy(self) -> Any:
        if self.cfg.policy_file is None:
            return None
        from edge.terminal.policy import PolicyRepository, load_policy_file

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

    def health(self) -> dict[str, Any]:
        stats = self.store.outbox_stats()
        now = self.clock.now()
        db_bytes = sum(
            os.path.getsize(p)
            for p in (self.store.path, self.store.path + "-wal")
            if os.path.exists(p)
        )
        amount, count = self.store.counters().get("offline", (0, 0))
        return {
            "device_id": self.cfg.device_id,
            "db_bytes": db_bytes,
            "db_budget_bytes": self.cfg.db_budget_mb * 1024 * 1024,
            "outbox_depth": stats.depth,
            "outbox_bytes": stats.bytes,
            "outbox_max_messages": self.cfg.outbox_max_messages,
            "outbox_oldest_age_s": None if stats.oldest is None else round(now - stats.oldest, 3),
            "offline_exposure_minor": amount,
            "offline_count": count,
            "policy_version": None if self.policy is None else self.policy.version,
            "link_up": self.peripherals.link.is_up(),
            "last_error": self.last_error,
        }

    def close(self) -> None:
        self.engine.close()
        self.store.close()
        for port in (self.peripherals.card_reader, self.peripherals.printer,
                     self.peripherals.acquirer, self.peripherals.link):  # fmt: skip
            close = getattr(port, "close", None)
            if callable(close):
                close()
