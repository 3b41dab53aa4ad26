"""Simulated terminals running the real runtime, many to a process, against a real cloud.

``SimFleet(spec, work, cloud_urls)`` makes ``spec.terminals`` terminals. Each is a real
``edge.terminal.service.terminal.Terminal`` with its own SQLite database (under
``work``), the real payment workflows, simulated card reader and printer
(``hwsim.card_reader``, ``hwsim.printer``), a ``hwsim.network.SimNetworkLink``, and an
``HttpAcquirer`` on the fleet's one ``hwsim.acquirer.SimAcquirer``; sales go in through
the POS app's local API object (``LocalApi.handle``), as a POS app's requests would.
Sync is the real device side: ``sync.device.identity.enroll`` with a one-time token,
then ``sync.device.client.SyncClient`` driven by ``sync.device.runner.SyncRunner.turn``
(its backoff and ``last_error`` rules), over HTTP to the real cloud (``hwsim.cloudrig``).

What it decides is drawn from ``spec.seed``: each terminal's store, group and hardware
model, its sync jitter, which terminals go offline (``offline(fraction)``), which sell,
the amounts and cards. Timing is wall-clock (short intervals in tests): what happens when
is not replayed, who and what is.

The API:

* ``FleetSpec`` / ``HardwareModel``: the fleet as data; ``SimFleet.plan()`` the
  per-terminal draw (``TerminalSpec``: name, store, group, model).
* ``enroll_all(tokens)``: ``tokens`` a list (one per terminal, in order) or a callable
  ``(TerminalSpec) -> token`` (``cloudrig.CloudRig.enroll_token`` fits:
  ``lambda t: rig.enroll_token(t.store, t.group)``).
* ``sync_all()``: one sync of every online terminal, in parallel; ``settle()`` syncs
  until every online terminal's outbox and audit log are acknowledged, plus one more
  round so the heartbeats report the state; ``run(seconds)``: each terminal syncs on its
  own interval (jittered) for that long, as the daemon's runner would, and due retries
  run (``engine.recover``, as the daemon's main loop does).
* ``run_until(predicate, timeout_s)``: ``run`` until the predicate (asked twice a
  second: a rollout's status through the Fleet API, say) holds.
* Late joiners: ``enroll_all(tokens, terminals)`` enrolls only those named; the others
  sell (offline to the cloud) and enroll when told. Clock skew: ``FleetSpec.skewed`` of
  the terminals run ``skew_s`` off (``SkewedClock``); the sync client learns the
  server's time from its ``clock_skew`` refusal, as on a real shop's terminal.
* ``sell(n)``: n payments through ``LocalApi`` on terminals drawn from the seed.
* ``down(t)``/``up(t)`` per terminal (``SimTerminal.down``), ``offline(fraction)``.
* Hardware models that fail a config: ``HardwareModel(fails_config=predicate)``: once a
  config document matching it is in force on a terminal of that model, its printer jams
  on every receipt (payments fail: the saga reverses them) and its ``last_error`` --
  which the heartbeat carries -- names it; a later config that does not match clears
  both. Done by wrapping the ``TerminalHooks`` the sync client is handed
  (``ModelHooks.refresh_documents``), nothing in ``edge`` or ``sync`` changed.
* Hardware models that refuse a config: ``HardwareModel(refuses_config=predicate)``: the
  ``update_config`` command is refused with reason ``hardware_unsupported: ...``,
  recorded, audited and reported as any refusal is. The sync client's
  ``CommandProcessor`` is replaced by a subclass (``ModelCommands``) that adds the
  model's check after the standard ones (it overrides the private ``_refusal``: a
  public seam in ``sync.device.commands`` would be better).
* ``install_release``: ``SimReleases`` installs in ``install_s`` and reports through
  the real ``release_result``; a model's ``fails_release`` makes it roll back (failed,
  version unchanged).
* ``measure()``: CPU and RSS of this process, syncs done, CPU per sync.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import resource
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hwsim.acquirer import SimAcquirer
from hwsim.card_reader import SimCardReader, make_card
from hwsim.network import SimNetworkLink
from hwsim.printer import SimPrinter

from edge.engine import Status, SystemClock, loader
from edge.store.template import share_new_databases
from edge.terminal.config import EdgeConfig, RiskLimits
from edge.terminal.drivers.acquirer_http import HttpAcquirer
from edge.terminal.sale.services import Peripherals
from edge.terminal.service import terminal as terminal_module
from edge.terminal.service.api import LocalApi
from edge.terminal.service.terminal import Terminal
from sync import wire
from sync.device import releases
from sync.device.client import SyncClient
from sync.device.commands import CommandProcessor
from sync.device.identity import DeviceIdentity, enroll, load_identity, load_key
from sync.device.runner import SyncRunner

#: A config document's content -> whether a hardware model fails (or refuses) it.
ConfigPredicate = Callable[[dict[str, Any]], bool]
#: Told of every request a terminal sent the cloud: (monotonic start, seconds, HTTP
#: status; 0 when no answer came).
RequestObserver = Callable[[float, float, int], None]

CARDS = ("visa", "mastercard", "amex")
#: What the failing model's heartbeat says (the start of its ``last_error``).
FAILURE_PREFIX = "printer_jam: "
#: The reason code of a model's refusal (``CommandResult.reason`` starts with it).
REFUSAL_CODE = "hardware_unsupported"
BINARY_VERSION = "simfleet-1"


@dataclass(frozen=True)
class HardwareModel:
    """A terminal model. ``fails_config``: configs under which its printer jams (and it
    says so); ``refuses_config``: configs it refuses outright (with ``refusal``)."""

    name: str
    weight: float = 1.0
    fails_config: ConfigPredicate | None = None
    refuses_config: ConfigPredicate | None = None
    refusal: str = "this model's firmware cannot apply the config"
    #: Releases (by name) that install but are not healthy on this model: the
    #: installer rolls back, the terminal reports the install failed, its version stays.
    fails_release: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class FleetSpec:
    terminals: int
    seed: int = 1
    stores: int = 4
    groups: tuple[str, ...] = ("tills", "kiosks")
    models: tuple[HardwareModel, ...] = (HardwareModel("TF-100"),)
    #: Seconds between a terminal's syncs while all is well, each drawn within
    #: +/- ``jitter`` (a fraction) of it.
    sync_interval_s: float = 1.0
    jitter: float = 0.25
    #: Threads that sync and sell (the cloud's requests in flight at most).
    threads: int = 8
    #: Terminal database durability: NORMAL spares a simulated fleet the fsyncs.
    synchronous: str = "NORMAL"
    batch_max_entries: int = 200
    #: The share of terminals whose clock is off, and by how much (s; negative: behind,
    #: so the commands' expiry, judged by the terminal's trusted time, still holds).
    skewed: float = 0.0
    skew_s: float = -900.0
    #: Parse the workflow files once for all the terminals (``share_workflow_definitions``).
    share_workflows: bool = True
    #: Make each terminal's database a copy of one migrated template
    #: (``edge.store.template``) rather than migrating each: about half its making.
    share_databases: bool = True
    #: Seconds a simulated release install takes (``SimReleases``).
    install_s: float = 1.0


@dataclass(frozen=True)
class TerminalSpec:
    index: int
    name: str
    store: str
    group: str | None
    model: HardwareModel
    #: Seconds this terminal's clock is off (negative: behind).
    skew_s: float = 0.0


class SkewedClock(SystemClock):
    """The wall clock, ``offset_s`` off (a shop's terminal with no NTP)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return time.time() + self.offset_s


@dataclass
class Sale:
    terminal: str
    run_id: str
    status: int
    decision: str | None
    channel: str | None


class FleetError(RuntimeError):
    pass


class LinkedHttp:
    """The HTTP a terminal's sync client and enrollment send with: the fleet's one
    ``httpx.Client`` (one connection pool), behind the terminal's own link: while it is
    down, a request fails as a lost network does (``httpx.ConnectError``), unsent."""

    def __init__(
        self, http: httpx.Client, link: SimNetworkLink, observe: RequestObserver | None = None
    ) -> None:
        self.http = http
        self.link = link
        self.observe = observe

    def post(self, url: str, **kw: Any) -> httpx.Response:
        if not self.link.is_up():
            raise httpx.ConnectError("simulated link down: the request was not sent")
        if self.observe is None:
            return self.http.post(url, **kw)
        t0 = time.monotonic()
        try:
            response = self.http.post(url, **kw)
        except httpx.HTTPError:
            self.observe(t0, time.monotonic() - t0, 0)
            raise
        self.observe(t0, time.monotonic() - t0, response.status_code)
        return response


class ModelHooks:
    """The ``TerminalHooks`` the sync client drives: the terminal's own, and after each
    command that stored documents, the hardware model's reaction to the config now in
    force (``SimTerminal.check_model``)."""

    def __init__(self, sim: SimTerminal) -> None:
        self.sim = sim

    @property
    def last_error(self) -> str | None:
        return self.sim.terminal.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self.sim.terminal.last_error = value

    def health(self) -> dict[str, Any]:
        return self.sim.terminal.health()

    def acknowledge(self, outbox_through: int, audit_through: int | None = None) -> int:
        return self.sim.terminal.acknowledge(outbox_through, audit_through)

    def refresh_documents(self) -> None:
        self.sim.terminal.refresh_documents()
        self.sim.check_model()

    def active_policy_version(self) -> int | None:
        return self.sim.terminal.active_policy_version()


class ModelCommands(CommandProcessor):
    """The real command processor, and after its own checks the model's: a config its
    hardware cannot take is refused (recorded, audited and reported as any refusal)."""

    def __init__(self, sim: SimTerminal, identity: DeviceIdentity) -> None:
        super().__init__(identity, sim.terminal.store, sim.hooks, sim.terminal.clock)
        self.sim = sim

    def _refusal(self, cmd: wire.Command) -> tuple[str, str] | None:
        found = super()._refusal(cmd)
        model = self.sim.spec.model
        if found is not None or model.refuses_config is None or cmd.document is None:
            return found
        if cmd.document.kind == "config" and model.refuses_config(dict(cmd.document.content)):
            why = f"{model.name}: {model.refusal} (config version {cmd.document.version})"
            return REFUSAL_CODE, why
        return None


_parsed_lock = threading.Lock()
_parsed: dict[tuple[str, int, int], Any] = {}


def _load_shared(path: str | os.PathLike[str]) -> Any:
    """``edge.engine.loader.load_file``, each file parsed once per process (by path,
    size and mtime): the terminals of a fleet register the same workflow files, and a
    ``Workflow`` is read-only once built, so they share one. Parsing them is most of
    what making a ``Terminal`` costs (about 30 ms of the 45)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _parsed_lock:
        if key not in _parsed:
            _parsed[key] = loader.load_file(p)
        return _parsed[key]


def share_workflow_definitions() -> None:
    """Make ``Terminal`` (which calls ``load_file`` per workflow file) use
    ``_load_shared``: set once per process, in ``edge.terminal.service.terminal``'s
    namespace only (nothing else loads through it)."""
    terminal_module.load_file = _load_shared  # type: ignore[attr-defined]


class SimReleases:
    """``install_release`` on a simulated terminal, in place of
    ``sync.device.releases.ReleaseHooks`` (which installs only from an installed release
    tree): the command is checked and recorded applied by the real processor; the
    install then "takes" ``FleetSpec.install_s`` and its outcome is reported by the real
    ``releases.finish`` (the ``release_result`` message and the audit row, in one
    transaction) on the first exchange after: ``installed``, and the terminal reports
    the release as its ``binary_version`` from then on; or, for a model whose
    ``fails_release`` says so, ``failed`` as install.sh's rollback says it (exit 4),
    its version unchanged. Nothing is downloaded."""

    def __init__(self, sim: SimTerminal) -> None:
        self.sim = sim
        self.paths = releases.paths_of(sim.data_dir)
        self._done_at: float | None = None
        self._lock = threading.Lock()

    def refusal(self, content: wire.ReleaseContent) -> tuple[str, str] | None:
        if self.running(content):
            return None
        if self.paths.pending.exists():
            return releases.INSTALL_IN_PROGRESS, "another release is being installed"
        return None

    def running(self, content: wire.ReleaseContent) -> bool:
        return self.sim.binary_version == content.release

    def begin(self, command_id: str, content: wire.ReleaseContent) -> None:
        self.paths.base.mkdir(parents=True, exist_ok=True)
        state = {"command_id": command_id, "release": content.release, "state": "installing",
                 "from_release": self.sim.binary_version, "bytes_downloaded": 0}  # fmt: skip
        self.paths.pending.write_text(json.dumps(state), encoding="utf-8")
        with self._lock:
            self._done_at = time.monotonic() + self.sim.fleet.spec.install_s

    def poll(self) -> None:
        with self._lock:
            if self._done_at is None or time.monotonic() < self._done_at:
                return
            self._done_at = None
        try:
            state = json.loads(self.paths.pending.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        release = str(state["release"])
        model = self.sim.spec.model
        if model.fails_release is not None and model.fails_release(release):
            why = f"{releases._INSTALL_EXIT[4]}: {model.name} does not start {release}"
            releases.finish(self.sim.terminal.store, self.sim.clock, self.paths, "failed", why)
            return
        releases.finish(self.sim.terminal.store, self.sim.clock, self.paths, "installed", None)
        self.sim.binary_version = release


class SimTerminal:
    """One simulated terminal: the real runtime, its simulated hardware, its sync."""

    def __init__(self, fleet: SimFleet, spec: TerminalSpec) -> None:
        self.fleet = fleet
        self.spec = spec
        self.name = spec.name
        self.data_dir = fleet.work / spec.name
        self.clock = SkewedClock(spec.skew_s) if spec.skew_s else SystemClock()
        self.rng = random.Random(f"{fleet.spec.seed}:{spec.index}")
        self.reader = SimCardReader()
        self.printer = SimPrinter()
        self.link = SimNetworkLink(self.clock)
        self.acquirer = HttpAcquirer(
            fleet.acquirer.url, client=fleet.acquirer_http, link=self.link, timeout_s=5
        )
        cfg = EdgeConfig(
            device_id=spec.name,
            data_dir=self.data_dir,
            socket_path=self.data_dir / "pos.sock",  # never opened: LocalApi is called
            synchronous=fleet.spec.synchronous,  # type: ignore[arg-type]
            risk=RiskLimits(
                online_random_percent=100,  # online while the link is up, offline when not
                offline_count_cap=10_000,
                offline_amount_cap_minor=10**9,
                velocity_max=10**6,
            ),
        )
        self.terminal = Terminal(
            cfg,
            Peripherals(self.reader, self.printer, self.acquirer, self.link),
            clock=self.clock,
            rng=random.Random(f"{fleet.spec.seed}:{spec.index}:engine"),
        )
        self.api = LocalApi(self.terminal)
        self.hooks = ModelHooks(self)
        self.http = LinkedHttp(fleet.http, self.link, fleet.observe)
        self.identity: DeviceIdentity | None = None
        self._binary_version = BINARY_VERSION
        self.client: SyncClient | None = None
        self.runner: SyncRunner | None = None
        self.sales: list[Sale] = []
        self.syncs = 0
        self.sync_failures = 0
        self._sync_lock = threading.Lock()
        self._sale_lock = threading.Lock()
        self._failing_under: int | None = None  # the config version that broke it
        self.terminal.start()
        self.check_model()

    @property
    def binary_version(self) -> str:
        """The release this terminal runs (``BINARY_VERSION`` until one is installed)."""
        return self._binary_version

    @binary_version.setter
    def binary_version(self, value: str) -> None:
        self._binary_version = value
        if self.client is not None:
            self.client.binary_version = value  # the next heartbeat says so

    @property
    def device_id(self) -> str | None:
        return None if self.identity is None else self.identity.device_id

    # --- enrollment and sync ----------------------------------------------------------

    def enroll(self, url: str, token: str) -> str:
        """Enroll with the one-time ``token`` at ``url`` (once); the cloud's device id."""
        identity = load_identity(self.data_dir)
        if identity is None:
            identity = enroll(
                url, token, self.data_dir, self.binary_version, self.http,  # type: ignore[arg-type]
                clock=self.clock.now,
                hardware=wire.Hardware(model=self.spec.model.name, serial=self.spec.name),
            )  # fmt: skip
        self._connect(identity)
        return identity.device_id

    def _connect(self, identity: DeviceIdentity) -> None:
        self.identity = identity
        client = SyncClient(
            identity,
            load_key(self.data_dir),
            self.terminal.store,
            self.hooks,
            self.clock,
            self.http,  # type: ignore[arg-type]
            binary_version=self.binary_version,
            max_entries=self.fleet.spec.batch_max_entries,
            key_dir=self.data_dir,
        )
        client.commands = ModelCommands(self, identity)
        client.commands.releases = SimReleases(self)  # type: ignore[assignment]
        self.client = client
        self.runner = SyncRunner(
            client,
            self.hooks,
            clock=self.clock,
            interval_s=self.fleet.spec.sync_interval_s,
            rng=random.Random(f"{self.fleet.spec.seed}:{self.spec.index}:backoff"),
        )

    def sync(self) -> float:
        """One turn of the sync runner (never raises); seconds until the next sync, with
        this terminal's jitter. Runs due retries first, as the daemon's loop does."""
        if self.runner is None:
            raise FleetError(f"{self.name} is not enrolled")
        with self._sync_lock:
            with contextlib.suppress(Exception):
                self.terminal.engine.recover()
            failures = self.runner.failures
            delay = self.runner.turn()
            self.syncs += 1
            if self.runner.failures > failures:
                self.sync_failures += 1
        if self.runner.failures == 0 and delay > 0:
            j = self.fleet.spec.jitter
            delay *= self.rng.uniform(1 - j, 1 + j)
        return delay

    def pending(self) -> bool:
        """Whether anything is left for the cloud: outbox messages, unacknowledged audit."""
        store = self.terminal.store
        if store.outbox_stats().depth:
            return True
        kept = store.audit_retention()
        acked = 0 if kept is None else kept.acked_seq
        return bool(store.audit_after(acked, 1))

    # --- the shop ---------------------------------------------------------------------

    def sell(self, amount_minor: int, card: str, key: str) -> Sale:
        """One payment through the local API, the card presented first."""
        with self._sale_lock:
            self.reader.insert(make_card(card))
            body = {"amount_minor": amount_minor, "currency": "EUR", "idempotency_key": key}
            status, view = self.api.handle("POST", "/v1/payments", json.dumps(body).encode())
        sale = Sale(self.name, str(view.get("run_id")), status, view.get("decision"),
                    view.get("channel"))  # fmt: skip
        self.sales.append(sale)
        return sale

    def approved(self) -> set[str]:
        """The payments this terminal approved for good (completed, decision approved),
        read from its store now (a sale retried by ``recover`` may have ended since)."""
        done = set()
        for sale in self.sales:
            run = self.terminal.engine.get(sale.run_id)
            if run.status is Status.COMPLETED and run.state.get("decision") == "approved":
                done.add(sale.run_id)
        return done

    def live_runs(self) -> int:
        """Runs not finished: retrying (a jammed printer), reversing, in flight."""
        return len(self.terminal.store.list_runs([Status.RUNNING, Status.COMPENSATING], 100))

    def down(self) -> None:
        """The shop's network goes: no acquirer (sales go offline), no cloud."""
        self.link.down()

    def up(self) -> None:
        self.link.up()

    @property
    def online(self) -> bool:
        return not self.link._forced_down and not self.link.in_window()

    # --- the hardware model -----------------------------------------------------------

    def check_model(self) -> None:
        """The model's reaction to the config in force: a config it fails jams the
        printer for good and says so in ``last_error``; one it does not, clears both."""
        model = self.spec.model
        if model.fails_config is None:
            return
        found = self.terminal.store.active_document("config")
        bad = found is not None and model.fails_config(dict(found[1]))
        if bad and found is not None:
            self._failing_under = found[0]
            self.printer.state = "jam"
            self.terminal.last_error = (
                f"{FAILURE_PREFIX}{model.name} printer jams on every receipt since config "
                f"version {found[0]} came into force"
            )
        elif self._failing_under is not None:
            self._failing_under = None
            self.printer.clear_jam()
            if (self.terminal.last_error or "").startswith(FAILURE_PREFIX):
                self.terminal.last_error = None

    @property
    def failing(self) -> bool:
        return self._failing_under is not None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.terminal.close()


@dataclass
class Measure:
    terminals: int
    cpu_s: float
    rss_mib: float
    syncs: int
    cpu_ms_per_sync: float | None
    wall_s: float


class SimFleet:
    """``spec.terminals`` simulated terminals in this process (see the module doc)."""

    def __init__(
        self,
        spec: FleetSpec,
        work: Path,
        cloud_urls: Sequence[str] | str,
        *,
        only: Iterable[int] | None = None,
        observe: RequestObserver | None = None,
    ) -> None:
        """``only``: make just these terminals of the plan (by index: one process's share
        of a fleet spread over several, ``hwsim.fleetsim``); ``observe``: told of every
        request to the cloud."""
        self.spec = spec
        self.observe = observe
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.urls = [cloud_urls] if isinstance(cloud_urls, str) else list(cloud_urls)
        self.rng = random.Random(spec.seed)
        self.acquirer = SimAcquirer()
        self.acquirer.start()
        limits = httpx.Limits(
            max_connections=spec.threads * 2, max_keepalive_connections=spec.threads * 2
        )
        self.acquirer_http = httpx.Client(timeout=5.0, trust_env=False, limits=limits)
        self.http = httpx.Client(timeout=10.0, trust_env=False, limits=limits)
        self.pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="simfleet")
        if spec.share_workflows:
            share_workflow_definitions()
        if spec.share_databases:
            share_new_databases()
        self.terminals: list[SimTerminal] = []
        self._by_index: dict[int, SimTerminal] = {}
        self._sale_n = 0
        self._n_lock = threading.Lock()
        self._started = time.monotonic()
        self._cpu0 = time.process_time()
        mine = self.plan()
        if only is not None:
            wanted = set(only)
            mine = [t for t in mine if t.index in wanted]
        try:
            self.terminals = list(self.pool.map(lambda s: SimTerminal(self, s), mine))
            self._by_index = {t.spec.index: t for t in self.terminals}
        except BaseException:
            self.close()
            raise

    # --- the plan ---------------------------------------------------------------------

    def plan(self) -> list[TerminalSpec]:
        """Who each terminal is, drawn from the seed: store, group, hardware model."""
        rng = random.Random(f"{self.spec.seed}:plan")
        models = self.spec.models
        weights = [m.weight for m in models]
        out = []
        for i in range(self.spec.terminals):
            store = f"store-{rng.randrange(self.spec.stores):03d}"
            group = rng.choice(self.spec.groups) if self.spec.groups else None
            model = rng.choices(models, weights)[0]
            skew = self.spec.skew_s if rng.random() < self.spec.skewed else 0.0
            out.append(TerminalSpec(i, f"T{i:05d}", store, group, model, skew))
        return out

    def __iter__(self) -> Any:
        return iter(self.terminals)

    def __len__(self) -> int:
        return len(self.terminals)

    def by_model(self, name: str) -> list[SimTerminal]:
        return [t for t in self.terminals if t.spec.model.name == name]

    def by_group(self, group: str) -> list[SimTerminal]:
        return [t for t in self.terminals if t.spec.group == group]

    def by_device(self) -> dict[str, SimTerminal]:
        return {t.device_id: t for t in self.terminals if t.device_id is not None}

    # --- enrollment -------------------------------------------------------------------

    def enroll_all(
        self,
        tokens: Sequence[str] | Callable[[TerminalSpec], str],
        terminals: Sequence[SimTerminal] | None = None,
    ) -> list[str]:
        """Enroll ``terminals`` (default: every one; a late joiner is enrolled later by
        naming it), in parallel, terminal i at ``urls[i % len(urls)]``; their device
        ids, in order. ``tokens``: one per terminal enrolled (in that order), or a
        callable making one per terminal."""
        chosen = list(self.terminals if terminals is None else terminals)
        if not callable(tokens) and len(tokens) != len(chosen):
            raise ValueError(f"{len(tokens)} tokens for {len(chosen)} terminals")

        def one(pair: tuple[int, SimTerminal]) -> str:
            n, t = pair
            token = tokens(t.spec) if callable(tokens) else tokens[n]
            return t.enroll(self.urls[t.spec.index % len(self.urls)], token)

        return list(self.pool.map(one, enumerate(chosen)))

    def enrolled(self) -> list[SimTerminal]:
        return [t for t in self.terminals if t.runner is not None]

    # --- sync -------------------------------------------------------------------------

    def sync_all(self, terminals: Iterable[SimTerminal] | None = None) -> int:
        """One sync of each online terminal (default: all online), in parallel; how many
        failed."""
        chosen = [t for t in (terminals or self.terminals) if t.online and t.runner is not None]
        before = sum(t.sync_failures for t in chosen)
        list(self.pool.map(lambda t: t.sync(), chosen))
        return sum(t.sync_failures for t in chosen) - before

    def settle(
        self, *, timeout_s: float = 60.0, terminals: Iterable[SimTerminal] | None = None
    ) -> int:
        """Sync the online terminals until none has anything left for the cloud and one
        more round went through (the heartbeats report the state, command results are
        up); rounds taken. ``FleetError`` past ``timeout_s``, naming who is behind."""
        chosen = [t for t in (terminals or self.terminals) if t.online and t.runner is not None]
        deadline = time.monotonic() + timeout_s
        rounds = 0
        while True:
            failed = self.sync_all(chosen)
            rounds += 1
            behind = [t for t in chosen if t.pending()]
            if not behind and not failed:
                self.sync_all(chosen)  # the heartbeat after the last acknowledgement
                return rounds + 1
            if time.monotonic() > deadline:
                names = ", ".join(f"{t.name} ({t.terminal.last_error})" for t in behind[:5])
                raise FleetError(
                    f"{len(behind)} terminal(s) not settled within {timeout_s:g}s; "
                    f"{failed} sync(s) failed in the last round: {names}"
                )

    def run_until(
        self, until: Callable[[], bool], timeout_s: float, *, sales_per_s: float = 0.0,
        check_s: float = 0.5,
    ) -> int:  # fmt: skip
        """``run`` until ``until()`` (asked every ``check_s``, in this thread) is true;
        syncs done. ``FleetError`` if it is not within ``timeout_s``."""
        reached: list[bool] = []
        done = self.run(timeout_s, sales_per_s=sales_per_s, until=until, check_s=check_s,
                        reached=reached)  # fmt: skip
        if not reached:
            raise FleetError(f"not reached within {timeout_s:g}s ({done} syncs): {until}")
        return done

    def run(
        self,
        seconds: float,
        *,
        sales_per_s: float = 0.0,
        until: Callable[[], bool] | None = None,
        check_s: float = 0.5,
        reached: list[bool] | None = None,
    ) -> int:
        """For ``seconds`` of wall time (or until ``until()``, asked every ``check_s``, is
        true; then True is put in ``reached``): each enrolled terminal syncs when its
        runner says (its interval, jittered; sooner when a batch was cut; its backoff
        after a failure), ``sales_per_s`` payments a second go through the fleet; syncs
        done."""
        end = time.monotonic() + seconds
        next_check = time.monotonic()
        now = time.monotonic()
        enrolled = [t for t in self.terminals if t.runner is not None]
        heap = [(now + self.rng.uniform(0, self.spec.sync_interval_s), t.spec.index)
                for t in enrolled]  # fmt: skip
        heapq.heapify(heap)
        lock = threading.Lock()
        inflight: set[int] = set()
        done = 0
        next_sale = now
        sale_every = 1.0 / sales_per_s if sales_per_s > 0 else None

        def one(t: SimTerminal) -> None:
            nonlocal done
            try:
                delay = t.sync()
            finally:
                with lock:
                    inflight.discard(t.spec.index)
                    done += 1
            with lock:
                heapq.heappush(heap, (time.monotonic() + delay, t.spec.index))

        while True:
            now = time.monotonic()
            if now >= end:
                break
            if until is not None and now >= next_check:
                next_check = now + check_s
                if until():
                    if reached is not None:
                        reached.append(True)
                    break
            if sale_every is not None and now >= next_sale:
                next_sale += sale_every
                self.pool.submit(self._one_sale)
            with lock:
                due = []
                while heap and heap[0][0] <= now:
                    due.append(heapq.heappop(heap)[1])
                wake = heap[0][0] if heap else end
            for i in due:
                with lock:
                    if i in inflight:
                        continue
                    inflight.add(i)
                self.pool.submit(one, self._by_index[i])
            nxt = min(wake, end, next_sale if sale_every is not None else end)
            time.sleep(max(0.0, min(0.05, nxt - time.monotonic())))
        while True:  # let the syncs in flight finish
            with lock:
                if not inflight:
                    return done
            time.sleep(0.01)

    # --- the shop ---------------------------------------------------------------------

    def _one_sale(self, t: SimTerminal | None = None) -> Sale:
        n = self._next_sale()
        rng = random.Random(f"{self.spec.seed}:sale:{n}")
        t = t or self.terminals[rng.randrange(len(self.terminals))]
        amount = rng.randrange(100, 2_000)
        return t.sell(amount, CARDS[n % len(CARDS)], f"sale-{self.spec.seed}-{n}")

    def _next_sale(self) -> int:
        with self._n_lock:
            self._sale_n += 1
            return self._sale_n

    def sell(self, n: int, terminals: Sequence[SimTerminal] | None = None) -> list[Sale]:
        """``n`` payments: on each of ``terminals`` (each its share), else on terminals
        drawn from the seed; in parallel, one at a time per terminal."""
        if terminals:
            chosen = [terminals[i % len(terminals)] for i in range(n)]
            return list(self.pool.map(self._one_sale, chosen))
        return list(self.pool.map(lambda _: self._one_sale(), range(n)))

    def finish(self, timeout_s: float = 30.0) -> None:
        """Run due retries on every terminal (``engine.recover``, as the daemon's loop
        does each second) until none has a run left unfinished; ``FleetError`` past
        ``timeout_s`` naming who has."""
        deadline = time.monotonic() + timeout_s
        while True:
            busy = [t for t in self.terminals if t.live_runs()]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise FleetError(
                    f"{len(busy)} terminal(s) still have unfinished runs after {timeout_s:g}s: "
                    + ", ".join(t.name for t in busy[:10])
                )
            for t in busy:
                with contextlib.suppress(Exception):
                    t.terminal.engine.recover()
            time.sleep(0.1)

    def offline(self, fraction: float) -> list[SimTerminal]:
        """Cut the link of ``fraction`` of the terminals (drawn from the seed); them."""
        rng = random.Random(f"{self.spec.seed}:offline:{fraction}")
        chosen = rng.sample(self.terminals, round(fraction * len(self.terminals)))
        for t in chosen:
            t.down()
        return chosen

    def heal(self) -> None:
        for t in self.terminals:
            t.up()

    # --- what it costs ----------------------------------------------------------------

    def measure(self) -> Measure:
        syncs = sum(t.syncs for t in self.terminals)
        cpu = time.process_time() - self._cpu0
        return Measure(
            terminals=len(self.terminals),
            cpu_s=round(cpu, 3),
            rss_mib=round(rss_mib(), 1),
            syncs=syncs,
            cpu_ms_per_sync=None if not syncs else round(1000 * cpu / syncs, 2),
            wall_s=round(time.monotonic() - self._started, 3),
        )

    def close(self) -> None:
        for t in self.terminals:
            with contextlib.suppress(Exception):
                t.close()
        self.pool.shutdown(wait=True)
        self.http.close()
        self.acquirer_http.close()
        self.acquirer.stop()

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rss_mib() -> float:
    """This process's resident set now (MiB), from /proc (peak: ``ru_maxrss``)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the bench: what a simulated terminal costs ----------------------------------------


def bench(
    terminals: int,
    work: Path,
    database_url: str,
    broker_url: str,
    *,
    seconds: float = 20.0,
    interval_s: float = 5.0,
    threads: int = 8,
    serves: int = 1,
    seed: int = 1,
) -> dict[str, Any]:
    """Start a cloud (``hwsim.cloudrig``) on ``database_url``, make ``terminals``
    terminals, enroll them (tokens through the Fleet API), sell one sale each, settle,
    then let them sync on ``interval_s`` for ``seconds``; what each phase cost (this
    process's CPU and RSS, the serve processes' CPU), as a dict.

    Measured on the 2-core machine (shared, loaded), 32 threads, 2 serves, 1 worker:
    5,000 terminals in one process, 30 s interval: 0.43 MiB RSS a terminal (2.5 GB
    peak; SQLite's page and statement caches are ~320 KiB of it), 14 ms to make one,
    141 syncs/s sustained (167 asked), 5.6 ms client CPU and 2.9 ms serve CPU a sync;
    3 file descriptors a terminal (10,000 in one process needs ``ulimit -n`` > 30,000,
    or two processes)."""
    from hwsim.cloudrig import CloudRig

    out: dict[str, Any] = {"terminals": terminals, "interval_s": interval_s,
                           "threads": threads, "serves": serves}  # fmt: skip
    phases: dict[str, Any] = {}
    out["phases"] = phases
    rig = CloudRig(database_url, broker_url, work / "cloud")
    rig.start(serves=serves, workers=1)
    serve_names = [p.name for p in rig.serves]

    def serve_cpu() -> float:
        return sum(rig.cpu_s(n) for n in serve_names)

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        w0, c0, s0, r0 = time.monotonic(), time.process_time(), serve_cpu(), rss_mib()
        result = fn()
        phases[name] = {
            "wall_s": round(time.monotonic() - w0, 3),
            "cpu_s": round(time.process_time() - c0, 3),
            "serve_cpu_s": round(serve_cpu() - s0, 3),
            "rss_mib_after": round(rss_mib(), 1),
            "rss_mib_delta": round(rss_mib() - r0, 1),
        }
        return result

    fleet: SimFleet | None = None
    try:
        spec = FleetSpec(terminals=terminals, seed=seed, sync_interval_s=interval_s,
                         threads=threads)  # fmt: skip
        base_rss = rss_mib()
        fleet = phase("make", lambda: SimFleet(spec, work / "fleet", rig.urls))
        assert fleet is not None
        out["rss_mib_per_terminal"] = round((rss_mib() - base_rss) / terminals, 3)
        api = rig.fleet()
        local = threading.local()
        clients: list[Any] = []

        def token(t: TerminalSpec) -> str:
            mine = getattr(local, "api", None)
            if mine is None:  # one client per thread
                mine = local.api = rig.fleet()
                clients.append(mine)
            body = {"store": t.store, "group": t.group}
            return str(mine.post("/api/v1/enroll-tokens", body)["token"])

        tokens = phase("tokens", lambda: list(fleet.pool.map(token, fleet.plan())))
        phase("enroll", lambda: fleet.enroll_all(tokens))
        phase("sell", lambda: fleet.sell(terminals))
        phase("settle", lambda: fleet.settle(timeout_s=600))
        before = fleet.measure().syncs
        phase("run", lambda: fleet.run(seconds))
        syncs = fleet.measure().syncs - before
        run = phases["run"]
        run["syncs"] = syncs
        run["syncs_per_s"] = round(syncs / run["wall_s"], 1)
        if syncs:
            run["client_cpu_ms_per_sync"] = round(1000 * run["cpu_s"] / syncs, 2)
            run["serve_cpu_ms_per_sync"] = round(1000 * run["serve_cpu_s"] / syncs, 2)
        per = phases["make"]
        out["make_ms_per_terminal"] = round(1000 * per["wall_s"] / terminals, 2)
        out["rss_mib_peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["serve_rss_mib"] = round(sum(rig.rss_mib(n) for n in serve_names), 1)
        out["sync_failures"] = sum(t.sync_failures for t in fleet)
        for client in [api, *clients]:
            client.close()
    finally:
        if fleet is not None:
            fleet.close()
        rig.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hwsim.simfleet --terminals N --database-url URL --broker-url URL``:
    the bench, its figures as JSON on stdout."""
    import argparse
    import logging
    import tempfile

    p = argparse.ArgumentParser(prog="python -m hwsim.simfleet", description=bench.__doc__)
    p.add_argument("--terminals", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--interval", type=float, default=5.0, help="sync interval (s)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--serves", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", required=True, help="a fresh PostgreSQL database")
    p.add_argument("--broker-url", required=True, help="a Redis database (redis://H:P/N)")
    p.add_argument("--work", help="where the files go (default: a new temporary directory)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = Path(a.work or tempfile.mkdtemp(prefix="simfleet-"))
    figures = bench(
        a.terminals, work, a.database_url, a.broker_url, seconds=a.seconds,
        interval_s=a.interval, threads=a.threads, serves=a.serves, seed=a.seed,
    )  # fmt: skip
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
