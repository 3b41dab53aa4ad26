"""Payments through the terminal daemon's local API, against engine-only runs of the same
workflow; the daemon's idle RSS; its time from exec to READY.

    python bench/payments.py [--quick] [--payments N] [--starts N] [--idle-s S]

Three legs run the terminal's ``payment`` workflow (``edge/terminal/sale/workflows``) with the
same mix of payments: alternately over the floor limit (online: an HTTP authorisation to
a ``SimAcquirer`` on loopback) and under it (approved offline within the risk limits),
cards rotating over visa/mastercard/amex; ``online_random_percent=0`` and offline caps
and velocity raised far beyond the run's size, so every payment is approved by the
channel its amount picks. Each leg has its own ``SimAcquirer`` and a fresh data dir;
the store is ``SqliteStore`` with ``synchronous=FULL``, as on a terminal.

- ``engine`` (the baseline): ``edge.terminal.service.terminal.Terminal`` in this process, with
  in-process simulators as its peripherals (``SimCardReader`` with the batch's cards
  queued before timing, ``SimPrinter``, ``SimNetworkLink`` up) and ``HttpAcquirer``;
  each payment is ``engine.start("payment", ...)`` then ``engine.get(run_id)``.
- ``engine_http_devices`` (to see where time goes): the same, but with the daemon's
  own HTTP device drivers (``daemon.http_peripherals``) against a ``SimDeviceServer``:
  the card read and the receipt are HTTP calls, the link check a cached GET.
- ``api``: the real daemon (``python -m edge.cli edge run --config ...``) as a
  subprocess, its devices a ``SimDeviceServer`` in this process; per payment the bench
  inserts a card (``SimDeviceServer.insert_test_card``, not timed) and POSTs
  ``/v1/payments`` over the Unix socket with one persistent httpx client.

Legs are interleaved in rounds so drift on a noisy machine hits all alike. The figure
that counts is ``ratio = api.payments_per_s / engine.payments_per_s``.

Start-up: the daemon is spawned with ``NOTIFY_SOCKET`` bound by the bench, each time on a
fresh data dir (migrations, a new data key); ``exec_to_ready_s`` is ``perf_counter`` from
``Popen`` to the ``READY=1`` datagram, then one ``GET /v1/health`` (the socket listens
before READY is sent), then SIGTERM. Baselines in the same run: a bare interpreter
(``python -c``) and one that only imports the daemon's modules, from ``Popen`` to its
first line on stdout. Idle RSS: ``VmRSS`` of the measured daemon after READY and
``--idle-s`` seconds without a request, against the bare interpreter's.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `edge` importable
    sys.path.insert(0, str(ROOT))


def _ensure_hwsim() -> None:
    """``hwsim`` is ``hardware-sim/`` (an installed mapping); load it by path if absent."""
    try:
        import hwsim  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "hwsim",
            ROOT / "hardware-sim" / "__init__.py",
            submodule_search_locations=[str(ROOT / "hardware-sim")],
        )
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["hwsim"] = module
        spec.loader.exec_module(module)


_ensure_hwsim()

import apsw  # noqa: E402
import httpx  # noqa: E402
from hwsim.acquirer import SimAcquirer  # noqa: E402
from hwsim.card_reader import SimCardReader, make_card  # noqa: E402
from hwsim.devices import SimDeviceServer  # noqa: E402
from hwsim.network import SimNetworkLink  # noqa: E402
from hwsim.printer import SimPrinter  # noqa: E402

from edge.engine import SystemClock  # noqa: E402
from edge.terminal.config import EdgeConfig, RiskLimits  # noqa: E402
from edge.terminal.drivers.acquirer_http import HttpAcquirer  # noqa: E402
from edge.terminal.sale.services import Peripherals  # noqa: E402
from edge.terminal.service.daemon import http_peripherals  # noqa: E402
from edge.terminal.service.terminal import Terminal  # noqa: E402

DEFAULT_PAYMENTS = 300
QUICK_PAYMENTS = 100
#: Per leg, not measured: first requests pay for lazy imports, connections, page cache.
WARMUP_PAYMENTS = 10
#: Interleaved batches per leg.
ROUNDS = 5
DEFAULT_STARTS = 5
QUICK_STARTS = 3
DEFAULT_IDLE_S = 10.0
QUICK_IDLE_S = 2.0
#: Requests per leg for the per-request overhead probes (no-op API call, device GET).
PROBES = 200
QUICK_PROBES = 50
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

FLOOR_MINOR = 2_500
ONLINE_AMOUNT_MINOR = 4_200  # over the floor: online
OFFLINE_AMOUNT_MINOR = 1_200  # under it: offline
CARDS = ("visa", "mastercard", "amex")
CURRENCY = "EUR"
#: Online/offline alternate; offline room and velocity far beyond any run's size, so no
#: offline payment is declined by a cap the bench would otherwise fill up.
RISK = RiskLimits(
    floor_limit_minor=FLOOR_MINOR,
    offline_amount_cap_minor=10**12,
    offline_count_cap=10**9,
    velocity_max=10**9,
    online_random_percent=0,
)
CARD_TIMEOUT_S = 5.0
ACQUIRER_TIMEOUT_S = 5.0

#: The daemon's modules, imported by the "imports only" start-up baseline.
DAEMON_IMPORTS = (
    "edge.cli",
    "edge.terminal.service.daemon",
    "edge.terminal.service.terminal",
    "edge.terminal.service.api",
    "edge.terminal.drivers.acquirer_http",
    "edge.terminal.drivers.devices_http",
    "edge.terminal.sale.payment_steps",
    "edge.store.sqlite",
)

TARGET_RATIO = 0.5
TARGET_READY_S = 2.0
TARGET_IDLE_RSS_MB = 70.0
TARGETS = {
    "ratio": f">= {TARGET_RATIO} (proposed: the API adds a process boundary and 2 device "
    "HTTP round trips per payment to the engine's 6 FULL write transactions: start + 5 commits)",
    "exec_to_ready_s_median": f"<= {TARGET_READY_S} (proposed; systemd's start timeout is 90 s)",
    "idle_rss_mb": f"<= {TARGET_IDLE_RSS_MB} (systemd/README: ~50-70 MB working set, "
    "MemoryHigh=96M, MemoryMax=128M)",
}


def progress(msg: str) -> None:
    print(f"[bench.payments] {msg}", file=sys.stderr, flush=True)


# --- helpers ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def latency_ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": round(percentile(s, 50) * 1e3, 3),
        "p90_ms": round(percentile(s, 90) * 1e3, 3),
        "p99_ms": round(percentile(s, 99) * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
        "mean_ms": round(statistics.fmean(s) * 1e3, 3),
    }


def payment_spec(i: int) -> tuple[int, str, str]:
    """(amount, card name, expected channel) of the bench's i-th payment in any leg."""
    online = i % 2 == 0
    amount = ONLINE_AMOUNT_MINOR if online else OFFLINE_AMOUNT_MINOR
    return amount, CARDS[i % len(CARDS)], "online" if online else "offline"


def short_tempdir(prefix: str) -> Path:
    """A directory whose paths fit in sockaddr_un (108 bytes) with room to spare."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    if len(str(d)) > 60:
        shutil.rmtree(d, ignore_errors=True)
        d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    return d


def proc_status_kb(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def rss_mb(pid: int) -> dict[str, float]:
    st = proc_status_kb(pid)
    return {
        "vm_rss_mb": round(st["VmRSS"] / 1024, 1),
        "vm_hwm_mb": round(st.get("VmHWM", 0) / 1024, 1),
        "rss_anon_mb": round(st.get("RssAnon", 0) / 1024, 1),
        "rss_file_mb": round(st.get("RssFile", 0) / 1024, 1),
    }


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """This environment without ``TILLFLOW_*`` config overrides, ``edge`` importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# --- the daemon ------------------------------------------------------------------------


def write_config(
    path: Path, data_dir: Path, socket_path: Path, devices_url: str, acquirer_url: str
) -> None:
    r = RISK
    path.write_text(
        f"device_id: T-BENCH\n"
        f"data_dir: {data_dir}\n"
        f"socket_path: {socket_path}\n"
        f"synchronous: FULL\n"
        f"log_format: json\n"
        f"risk:\n"
        f"  floor_limit_minor: {r.floor_limit_minor}\n"
        f"  offline_amount_cap_minor: {r.offline_amount_cap_minor}\n"
        f"  offline_count_cap: {r.offline_count_cap}\n"
        f"  velocity_max: {r.velocity_max}\n"
        f"  online_random_percent: {r.online_random_percent}\n"
        f"peripherals:\n"
        f"  card_reader: {{url: '{devices_url}', timeout_s: {CARD_TIMEOUT_S}}}\n"
        f"  printer: {{url: '{devices_url}'}}\n"
        f"  link: {{url: '{devices_url}/link'}}\n"
        f"  acquirer: {{url: '{acquirer_url}', timeout_s: {ACQUIRER_TIMEOUT_S}}}\n",
        encoding="utf-8",
    )


class DaemonProcess:
    """One daemon subprocess with its own config, data dir, socket and NOTIFY_SOCKET."""

    def __init__(self, home: Path, devices_url: str, acquirer_url: str) -> None:
        home.mkdir(parents=True)
        self.home = home
        self.socket_path = home / "edge.sock"
        self.config = home / "edge.yaml"
        self.log = home / "daemon.log"
        write_config(self.config, home / "data", self.socket_path, devices_url, acquirer_url)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = home / "notify"
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_exec = 0.0

    def spawn(self) -> None:
        env = {**child_env(), "NOTIFY_SOCKET": str(self.notify_path)}
        cmd = [sys.executable, "-m", "edge.cli", "edge", "run", "--config", str(self.config)]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.t_exec = time.perf_counter()
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log
            )

    def wait_for(self, field: str, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds from exec until a datagram with ``field`` (e.g. READY=1) arrived."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"daemon sent no {field} within {timeout_s}s{self.log_tail()}")
            ready, _, _ = select.select([self.notify], [], [], min(left, 0.2))
            if ready:
                msg = self.notify.recv(4096).decode(errors="replace")
                if field in msg.splitlines():
                    return time.perf_counter() - self.t_exec
            elif self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} before {field}{self.log_tail()}"
                )

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://pos",
            timeout=timeout_s,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- daemon log (tail) ---\n" + "\n".join(text) if text else ""

    def stop(self) -> int | None:
        rc = None if self.proc is None else stop_process(self.proc)
        self.notify.close()
        return rc


# --- legs ------------------------------------------------------------------------------


@dataclass
class Leg:
    """Sequential payments: per-payment latency, wall time and CPU per batch."""

    name: str
    pay: Callable[[int, str], float]  # (index, key) -> seconds of the timed call
    prepare: Callable[[list[int]], None] = lambda _: None  # untimed, before a batch
    cpu: Callable[[], float] = time.process_time
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    count: int = 0
    batches: list[float] = field(default_factory=list)  # payments/s of each batch
    next_index: int = 0

    def batch(self, n: int, *, measure: bool = True) -> None:
        indices = list(range(self.next_index, self.next_index + n))
        self.next_index += n
        self.prepare(indices)
        lat: list[float] = []
        c0 = self.cpu()
        t0 = time.perf_counter()
        for i in indices:
            lat.append(self.pay(i, f"{self.name}-{i}"))
        wall = time.perf_counter() - t0
        cpu = self.cpu() - c0
        if measure:
            self.latencies += lat
            self.wall_s += wall
            self.cpu_s += cpu
            self.count += n
            self.batches.append(n / wall)

    def result(self) -> dict[str, Any]:
        return {
            "payments": self.count,
            "payments_per_s": round(self.count / self.wall_s, 2),
            **latency_ms(self.latencies),
            "batch_payments_per_s": [round(b, 2) for b in self.batches],
            "cpu_ms_per_payment": round(self.cpu_s / self.count * 1e3, 3),
        }


def check_state(leg: str, i: int, status: str, decision: Any, channel: Any) -> None:
    _, _, expected = payment_spec(i)
    if (status, decision, channel) != ("COMPLETED", "approved", expected):
        raise SystemExit(
            f"{leg}: payment {i} ended {status}/{decision}/{channel}, "
            f"expected COMPLETED/approved/{expected}"
        )


def terminal_config(home: Path, devices_url: str, acquirer_url: str) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {
            "device_id": "T-BENCH",
            "data_dir": str(home / "data"),
            "socket_path": str(home / "unused.sock"),
            "synchronous": "FULL",
            "risk": RISK.model_dump(),
            "peripherals": {
                "card_reader": {"url": devices_url, "timeout_s": CARD_TIMEOUT_S},
                "printer": {"url": devices_url},
                "link": {"url": f"{devices_url}/link"},
                "acquirer": {"url": acquirer_url, "timeout_s": ACQUIRER_TIMEOUT_S},
            },
        }
    )


def engine_leg(name: str, terminal: Terminal, queue: Callable[[str], None]) -> Leg:
    """Payments straight into ``terminal.engine``; ``queue(card)`` presents a card."""
    engine = terminal.engine

    def prepare(indices: list[int]) -> None:
        for i in indices:
            queue(payment_spec(i)[1])

    def pay(i: int, key: str) -> float:
        amount, _, _ = payment_spec(i)
        t0 = time.perf_counter()
        run_id = engine.start(
            "payment",
            {"amount_minor": amount, "currency": CURRENCY},
            idempotency_key=f"pos:payment:{key}",
        )
        run = engine.get(run_id)
        elapsed = time.perf_counter() - t0
        check_state(name, i, str(run.status), run.state.get("decision"), run.state.get("channel"))
        return elapsed

    return Leg(name, pay, prepare)


def api_leg(daemon: DaemonProcess, client: httpx.Client, devices: SimDeviceServer) -> Leg:
    def pay(i: int, key: str) -> float:
        amount, card, _ = payment_spec(i)
        devices.insert_test_card(card)
        t0 = time.perf_counter()
        r = client.post(
            "/v1/payments",
            json={"amount_minor": amount, "currency": CURRENCY, "idempotency_key": key},
        )
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"api: payment {i}: HTTP {r.status_code} {r.text}")
        body = r.json()
        check_state("api", i, body["status"], body.get("decision"), body.get("channel"))
        return elapsed

    return Leg("api", pay, cpu=lambda: proc_cpu_s(daemon.pid))


def check_acquirer(name: str, acquirer: SimAcquirer, leg: Leg) -> None:
    online = sum(1 for i in range(leg.next_index) if payment_spec(i)[2] == "online")
    got = len(acquirer.effects("authorize"))
    if got != online:
        raise SystemExit(f"{name}: the acquirer saw {got} authorisations, expected {online}")


# --- start-up --------------------------------------------------------------------------


def interpreter_baseline(code: str) -> tuple[float, dict[str, float]]:
    """Seconds from ``Popen`` to the first line of ``python -c code`` (which then waits on
    stdin), and its RSS at that moment."""
    script = f"{code}\nimport sys\nprint('up', flush=True)\nsys.stdin.read()"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - t0
        if line.strip() != b"up":
            raise RuntimeError(f"baseline interpreter failed: {code!r}")
        rss = rss_mb(proc.pid)
        proc.stdin.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return elapsed, rss


def measure_baselines(samples: int) -> dict[str, Any]:
    imports = "; ".join(f"import {m}" for m in DAEMON_IMPORTS)
    bare_t, bare_rss, imp_t, imp_rss = [], [], [], []
    for _ in range(samples):
        t, rss = interpreter_baseline("pass")
        bare_t.append(t)
        bare_rss.append(rss["vm_rss_mb"])
        t, rss = interpreter_baseline(imports)
        imp_t.append(t)
        imp_rss.append(rss["vm_rss_mb"])
    return {
        "bare_python_start_s_median": round(statistics.median(bare_t), 4),
        "bare_python_rss_mb": round(statistics.median(bare_rss), 1),
        "imports_only_start_s_median": round(statistics.median(imp_t), 4),
        "imports_only_rss_mb": round(statistics.median(imp_rss), 1),
        "imports": list(DAEMON_IMPORTS),
    }


def one_start(home: Path, devices_url: str, acquirer_url: str) -> dict[str, float]:
    daemon = DaemonProcess(home, devices_url, acquirer_url)
    try:
        daemon.spawn()
        ready = daemon.wait_for("READY=1")
        with daemon.client(timeout_s=10) as client:
            r = client.get("/v1/health")
            health = time.perf_counter() - daemon.t_exec
            if r.status_code != 200:
                raise RuntimeError(f"health answered {r.status_code}: {r.text}")
        assert daemon.proc is not None
        t_term = time.perf_counter()
        daemon.proc.send_signal(signal.SIGTERM)
        rc = daemon.proc.wait(STOP_TIMEOUT_S)
        stopped = time.perf_counter() - t_term
        if rc != 0:
            raise RuntimeError(f"daemon exited {rc} on SIGTERM{daemon.log_tail()}")
    finally:
        daemon.stop()
    return {"ready": ready, "health": health, "stop": stopped}


def measure_startup(root: Path, starts: int, devices_url: str, acquirer_url: str) -> dict[str, Any]:
    samples = []
    for n in range(starts):
        s = one_start(root / f"start{n}", devices_url, acquirer_url)
        progress(
            f"start {n + 1}/{starts}: READY after {s['ready']:.3f}s, "
            f"health after {s['health']:.3f}s, SIGTERM->exit {s['stop']:.3f}s"
        )
        samples.append(s)
    ready = [s["ready"] for s in samples]
    health = [s["health"] for s in samples]
    stop = [s["stop"] for s in samples]
    return {
        "starts": starts,
        "fresh_data_dir_each": True,
        "exec_to_ready_s_median": round(statistics.median(ready), 4),
        "exec_to_ready_s": [round(x, 4) for x in ready],
        "exec_to_first_health_s_median": round(statistics.median(health), 4),
        "exec_to_first_health_s": [round(x, 4) for x in health],
        "sigterm_to_exit_s_median": round(statistics.median(stop), 4),
    }


# --- per-request overhead probes -------------------------------------------------------


def probe(n: int, call: Callable[[], httpx.Response], expect: int) -> dict[str, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = call()
        lat.append(time.perf_counter() - t0)
        if r.status_code != expect:
            raise SystemExit(f"probe answered {r.status_code}, expected {expect}: {r.text}")
    s = sorted(lat)
    return {
        "p50_ms": round(percentile(s, 50) * 1e3, 3),
        "p99_ms": round(percentile(s, 99) * 1e3, 3),
    }


# --- main ------------------------------------------------------------------------------


def filesystem(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (ext4, tmpfs...), from /proc/mounts."""
    best, kind = "", None
    target = str(path.resolve())
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return None
    return kind


def environment(work: Path) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "httpx": httpx.__version__,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "tmpdir": str(work.parent),
        "tmpdir_fs": filesystem(work.parent),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    payments = args.payments or (QUICK_PAYMENTS if quick else DEFAULT_PAYMENTS)
    warmup = WARMUP_PAYMENTS
    starts = args.starts or (QUICK_STARTS if quick else DEFAULT_STARTS)
    idle_s = args.idle_s if args.idle_s is not None else (QUICK_IDLE_S if quick else DEFAULT_IDLE_S)
    probes = QUICK_PROBES if quick else PROBES

    work = short_tempdir("tfb-")
    cleanups: list[Callable[[], Any]] = []
    try:
        acq_engine = SimAcquirer().start()
        cleanups.append(acq_engine.stop)
        acq_http = SimAcquirer().start()
        cleanups.append(acq_http.stop)
        acq_api = SimAcquirer().start()
        cleanups.append(acq_api.stop)
        dev_http = SimDeviceServer().start()
        cleanups.append(dev_http.stop)
        dev_api = SimDeviceServer().start()
        cleanups.append(dev_api.stop)
        # The start-up samples get their own servers: their health checks and link
        # probes must not touch the measured legs' simulators.
        dev_start = SimDeviceServer().start()
        cleanups.append(dev_start.stop)
        acq_start = SimAcquirer().start()
        cleanups.append(acq_start.stop)

        progress(f"baselines: bare interpreter and daemon imports, {starts} each")
        baselines = measure_baselines(starts)
        progress(f"start-up: {starts} daemon starts on fresh data dirs")
        startup = measure_startup(work, starts, dev_start.url, acq_start.url)

        progress("spawning the measured daemon")
        daemon = DaemonProcess(work / "daemon", dev_api.url, acq_api.url)
        cleanups.append(daemon.stop)
        daemon.spawn()
        ready_s = daemon.wait_for("READY=1")
        progress(f"daemon pid {daemon.pid} READY after {ready_s:.3f}s; idle {idle_s:g}s")
        time.sleep(idle_s)
        idle = rss_mb(daemon.pid)
        idle_cpu_s = proc_cpu_s(daemon.pid)
        progress(f"idle VmRSS {idle['vm_rss_mb']} MB")

        client = daemon.client()
        cleanups.append(client.close)

        clock = SystemClock()
        t_engine_home = work / "engine"
        cfg = terminal_config(t_engine_home, dev_http.url, acq_engine.url)
        link = SimNetworkLink(clock)
        reader = SimCardReader()
        t_engine = Terminal(
            cfg,
            Peripherals(
                card_reader=reader,
                printer=SimPrinter(),
                acquirer=HttpAcquirer(acq_engine.url, link=link, timeout_s=ACQUIRER_TIMEOUT_S),
                link=link,
            ),
            clock=clock,
        )
        cleanups.append(t_engine.close)
        cfg_http = terminal_config(work / "engine_http", dev_http.url, acq_http.url)
        t_http = Terminal(cfg_http, http_peripherals(cfg_http), clock=clock)
        cleanups.append(t_http.close)

        legs = [
            engine_leg("engine", t_engine, lambda card: reader.insert(make_card(card))),
            engine_leg("engine_http_devices", t_http, lambda card: dev_http.insert_test_card(card)),
            api_leg(daemon, client, dev_api),
        ]
        progress(f"warm-up: {warmup} payments per leg")
        for leg in legs:
            leg.batch(warmup, measure=False)
        for r, n in enumerate(split(payments, ROUNDS)):
            for leg in legs:
                leg.batch(n)
            progress(
                f"round {r + 1}/{ROUNDS}: "
                + ", ".join(f"{leg.name} {leg.batches[-1]:.1f}/s" for leg in legs)
            )
        check_acquirer("engine", acq_engine, legs[0])
        check_acquirer("engine_http_devices", acq_http, legs[1])
        check_acquirer("api", acq_api, legs[2])
        after = rss_mb(daemon.pid)

        progress("per-request probes: no-op API call, health, device-server GET /link")
        noop = probe(probes, lambda: client.get("/v1/bench-no-such-route"), 404)
        health = probe(probes, lambda: client.get("/v1/health"), 200)
        with httpx.Client(trust_env=False) as dev_client:
            link_url = f"{dev_http.url}/link"
            device_get = probe(probes, lambda: dev_client.get(link_url), 200)

        progress("SIGTERM to the measured daemon")
        client.close()
        t_term = time.perf_counter()
        rc = daemon.stop()
        stop_s = time.perf_counter() - t_term
        if rc != 0:
            raise SystemExit(f"measured daemon exited {rc} on SIGTERM{daemon.log_tail()}")
    finally:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as exc:  # cleanup goes on; the first error is the one raised
                progress(f"cleanup: {type(exc).__name__}: {exc}")
        shutil.rmtree(work, ignore_errors=True)

    eng, http_dev, api = (leg.result() for leg in legs)
    ratio = api["payments_per_s"] / eng["payments_per_s"]
    per_payment = {
        "engine_ms": round(1e3 / eng["payments_per_s"], 3),
        "device_http_ms": round(1e3 / http_dev["payments_per_s"] - 1e3 / eng["payments_per_s"], 3),
        "api_and_process_boundary_ms": round(
            1e3 / api["payments_per_s"] - 1e3 / http_dev["payments_per_s"], 3
        ),
        "total_api_ms": round(1e3 / api["payments_per_s"], 3),
    }
    ready_med = startup["exec_to_ready_s_median"]
    notes = [
        f"device round trips: {per_payment['device_http_ms']} ms per payment "
        "(engine_http_devices - engine): the card read and the receipt are HTTP calls to "
        "the device server (the link check is cached 1 s); one bare GET /link costs "
        f"{device_get['p50_ms']} ms p50 over loopback TCP",
        f"local API and process boundary: {per_payment['api_and_process_boundary_ms']} ms "
        "per payment (api - engine_http_devices); a no-op request over the Unix socket "
        f"(404 from the stdlib server, httpx client) costs {noop['p50_ms']} ms p50; the "
        "rest is request validation, run_view and JSON",
        f"engine: {eng['cpu_ms_per_payment']} ms CPU of {per_payment['engine_ms']} ms wall "
        "per payment: where CPU is close to wall, fsync is cheap on this filesystem "
        f"({environment(work)['tmpdir_fs']}); on a terminal's flash the commits' fsyncs "
        "dominate and the ratio rises",
        f"start-up: {baselines['imports_only_start_s_median']} s of the "
        f"{ready_med} s to READY is importing the daemon's modules (bare interpreter "
        f"{baselines['bare_python_start_s_median']} s); the rest opens and migrates a new "
        "database, makes the data key and opens the socket",
    ]
    out: dict[str, Any] = {
        "benchmark": "payments",
        "quick": quick,
        "workflow": "payment (edge/terminal/sale/workflows/payment.yaml)",
        "mix": {
            "online_amount_minor": ONLINE_AMOUNT_MINOR,
            "offline_amount_minor": OFFLINE_AMOUNT_MINOR,
            "floor_limit_minor": FLOOR_MINOR,
            "online_share": 0.5,
            "cards": list(CARDS),
            "online_random_percent": 0,
            "note": "alternating online/offline; offline caps and velocity raised beyond the "
            "run so every payment is approved by the channel its amount picks",
        },
        "synchronous": "FULL",
        "warmup_payments_per_leg": warmup,
        "rounds": ROUNDS,
        "engine": {
            **eng,
            "setup": "Terminal in-process: SimCardReader (cards queued before each batch), "
            "SimPrinter, SimNetworkLink, HttpAcquirer -> SimAcquirer on loopback",
            "cpu_note": "process CPU: includes this process's SimAcquirer threads",
        },
        "engine_http_devices": {
            **http_dev,
            "setup": "Terminal in-process with the daemon's HTTP device drivers -> "
            "SimDeviceServer (card read + print are HTTP calls; link check cached 1 s)",
            "cpu_note": "process CPU: includes SimDeviceServer and SimAcquirer threads",
        },
        "api": {
            **api,
            "setup": "daemon subprocess; POST /v1/payments over its Unix socket, one "
            "persistent httpx client; SimDeviceServer + SimAcquirer in the bench process",
            "cpu_note": "cpu_ms_per_payment is the daemon's (utime+stime, all threads)",
        },
        "ratio": round(ratio, 3),
        "ratio_http_devices_to_engine": round(
            http_dev["payments_per_s"] / eng["payments_per_s"], 3
        ),
        "meets_ratio_target": ratio >= TARGET_RATIO,
        "per_payment_breakdown_from_rates": per_payment,
        "per_request_probes": {
            "requests": probes,
            "api_noop_404_over_uds": noop,
            "api_health_over_uds": health,
            "device_server_get_link_over_tcp": device_get,
        },
        "startup": {
            **startup,
            **baselines,
            "ready_vs_bare_python_ratio": round(
                ready_med / baselines["bare_python_start_s_median"], 2
            ),
            "ready_minus_imports_s": round(ready_med - baselines["imports_only_start_s_median"], 4),
            "meets_ready_target": ready_med <= TARGET_READY_S,
            "note": "health is requested once READY=1 arrived (the socket listens before it)",
        },
        "memory": {
            "idle_s": idle_s,
            "idle_note": (
                f"--quick: idle {idle_s:g} s after READY, not the full {DEFAULT_IDLE_S:g} s"
                if quick and idle_s < DEFAULT_IDLE_S
                else f"idle {idle_s:g} s after READY, no request made"
            ),
            "idle_rss_mb": idle["vm_rss_mb"],
            "idle": idle,
            "idle_cpu_s_since_exec": round(idle_cpu_s, 3),
            "after_payments": after,
            "bare_python_rss_mb": baselines["bare_python_rss_mb"],
            "idle_rss_vs_bare_python_ratio": round(
                idle["vm_rss_mb"] / baselines["bare_python_rss_mb"], 2
            ),
            "unit": "MiB (kB from /proc/<pid>/status / 1024), as systemd's MemoryMax=",
            "meets_idle_rss_target": idle["vm_rss_mb"] <= TARGET_IDLE_RSS_MB,
        },
        "measured_daemon": {
            "exec_to_ready_s": round(ready_s, 4),
            "sigterm_to_exit_s": round(stop_s, 4),
            "exit_status": rc,
        },
        "notes": notes,
        "targets": TARGETS,
        "env": environment(work),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PAYMENTS} payments per leg, {QUICK_STARTS} starts, {QUICK_IDLE_S:g} s idle",
    )
    parser.add_argument(
        "--payments", type=int, help=f"measured payments per leg (default {DEFAULT_PAYMENTS})"
    )
    parser.add_argument("--starts", type=int, help=f"daemon starts (default {DEFAULT_STARTS})")
    parser.add_argument(
        "--idle-s", type=float, help=f"idle seconds before reading RSS (default {DEFAULT_IDLE_S:g})"
    )
    args = parser.parse_args(argv)
    if args.payments is not None and args.payments < ROUNDS:
        parser.error(f"--payments must be at least {ROUNDS}")
    if args.starts is not None and args.starts < 1:
        parser.error("--starts must be at least 1")
    if args.idle_s is not None and args.idle_s < 0:
        parser.error("--idle-s must not be negative")
    t0 = time.perf_counter()
    out = run(args)
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
