"""The operator dashboard's page render times with 10,000 devices, on the server and in
Chromium, against the Fleet API's device list of the same page size in the same run
(the baseline).

    python bench/dashboard.py [--quick] [--devices N] [--repeat N] [--no-browser]

Setup (in a scratch database, dropped at the end): ``tillflow cloud serve --port 0``
migrates it; ``--devices`` devices are then seeded **by SQL** (``INSERT ... SELECT
generate_series``: the devices in 200 stores and 8 groups, a heartbeat each with mixed
health and versions, 1% with a stalled outbox, 0.5% with a broken audit chain, 20 rows
of a device's audit chain, 30 commands) -- enrolling 10,000 terminals through the sync
routes would measure enrollment, not the pages. One config rollout over every device is
started **through the API** (``POST /api/v1/config/rollout``: its planning writes the
10,000 ``rollout_devices`` rows; no worker runs it), then its device statuses are spread
by SQL over healthy, applied, failed, refused and notified, so the funnel has something
to draw.

Legs (``--repeat`` requests each, after one warm-up; the median and p95 in ms):

* ``server``: each page fetched with the session cookie by httpx (the server's time
  plus one local round trip): fleet, fleet filtered by a store, rollouts, the rollout,
  its live fragment, one device, audit (with a verification of the cloud's chain);
* ``baseline``: ``GET /api/v1/devices?limit=50`` with a bearer token (the Fleet API's
  list of the page's size); ``ratio.<page>`` = the page's median / the baseline's;
* ``chromium``: ``hwsim.screenshots.capture`` (Debian's Chromium: navigation until the
  page's content is drawn), the median of ``--browser-runs`` runs per page.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "hardware-sim"))  # hwsim, as the editable install maps it

import httpx  # noqa: E402
import psycopg  # noqa: E402

PG_URL = os.environ.get("TILLFLOW_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SERVE_TIMEOUT_S = 120.0


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"tillflow_bench_dashboard_{os.getpid()}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_URL, name)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env["TILLFLOW_DATA_DIR"] = str(work / "data")  # the serverless broker's folder
    return env


@contextlib.contextmanager
def cloud_server(db: str, work: Path) -> Iterator[str]:
    """``tillflow cloud serve`` on a free port; yields its base URL."""
    cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve", "--database-url", db]
    cmd += ["--port", "0", "--signing-key", str(work / "cp.key")]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=_env(work), cwd=work)
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith("listening on "):
                url = line.split()[-1].strip()
        if url is None:
            raise SystemExit(f"cloud serve did not start: {(work / 'serve.log').read_text()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def admin_token(db: str, work: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edge.cli", "cloud", "api-token", "create", "--role", "admin",
         "--name", "bench", "--json", "--database-url", db],
        capture_output=True, text=True, check=True, timeout=SERVE_TIMEOUT_S, env=_env(work),
    )  # fmt: skip
    return str(json.loads(out.stdout)["token"])


#: The seed, one statement each (run in order).
SEED = (
    """
INSERT INTO devices (device_id, store, group_name, public_key, status, enrolled_at,
                     binary_version, hardware)
SELECT format('dev-%%s', lpad(i::text, 5, '0')),
       format('store-%%s', lpad((i %% 200)::text, 3, '0')), format('group-%%s', i %% 8),
       'bench-key', CASE WHEN i %% 500 = 0 THEN 'revoked' ELSE 'active' END,
       %(now)s - 86400, '1.4.' || (i %% 3), '{"model": "TF-100"}'
FROM generate_series(1, %(n)s) AS i
""",
    """
INSERT INTO device_health (device_id, stream, heartbeat, last_seen_at)
SELECT format('dev-%%s', lpad(i::text, 5, '0')), md5(i::text),
       jsonb_build_object(
           'at', %(now)s - (i %% 97), 'binary_version', '1.4.' || (i %% 3),
           'config_version', 1 + (i %% 4), 'policy_version', 1 + (i %% 2),
           'storage_state', CASE WHEN i %% 53 = 0 THEN 'full' WHEN i %% 17 = 0 THEN 'high_water'
                                 ELSE 'ok' END,
           'storage_used_percent', (i %% 90)::float8,
           'outbox_depth', CASE WHEN i %% 100 = 0 THEN 40 ELSE i %% 3 END,
           'outbox_oldest_age_s', CASE WHEN i %% 100 = 0 THEN 3600.0 WHEN i %% 3 = 0 THEN NULL
                                       ELSE 5.0 END,
           'offline_exposure_minor', 0, 'offline_count', 0,
           'last_error', CASE WHEN i %% 100 = 0 THEN 'upload: connection refused' END),
       %(now)s - CASE WHEN i %% 250 = 0 THEN 7200 ELSE i %% 97 END
FROM generate_series(1, %(n)s) AS i
WHERE i %% 400 <> 0
""",
    """
INSERT INTO audit_chains (device_id, stream, chain, base_seq, base_hash, head_seq, head_hash,
                          state, first_bad_seq, reason, broken_at, updated_at)
SELECT format('dev-%%s', lpad(i::text, 5, '0')), md5(i::text), 0, 0, repeat('0', 64), 20,
       md5('h' || i), CASE WHEN i %% 200 = 7 THEN 'broken' ELSE 'ok' END,
       CASE WHEN i %% 200 = 7 THEN 12 END, CASE WHEN i %% 200 = 7 THEN 'prev_hash mismatch' END,
       CASE WHEN i %% 200 = 7 THEN %(now)s END, %(now)s
FROM generate_series(1, %(n)s) AS i
""",
    """
INSERT INTO commands (command_id, device_id, seq, action, envelope, status, reason,
                      created_at, expires_at, delivered_at, result_at)
SELECT 'cmd-' || c, 'dev-00001', c, 'update_config', '{}',
       CASE WHEN c %% 5 = 0 THEN 'refused' ELSE 'applied' END,
       CASE WHEN c %% 5 = 0 THEN 'hardware_unsupported: bench' END,
       %(now)s - 3600 + c, %(now)s + 3600, %(now)s - 3500 + c, %(now)s - 3400 + c
FROM generate_series(1, 30) AS c
""",
)

SPREAD = (
    """
UPDATE rollout_devices SET
    status = (ARRAY['healthy', 'healthy', 'healthy', 'applied', 'notified', 'failed',
                    'refused', 'healthy'])[1 + abs(hashtext(device_id)) %% 8],
    notified_at = %(now)s - 600, applied_at = %(now)s - 500
WHERE rollout_id = %(rollout_id)s AND wave = 1
""",
    """
UPDATE rollout_waves SET status = 'running', started_at = %(now)s - 600
WHERE rollout_id = %(rollout_id)s AND wave = 1
""",
    """
UPDATE rollouts SET status = 'running', current_wave = 1 WHERE rollout_id = %(rollout_id)s
""",
)


def seed(db: str, n: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(db, autocommit=True) as conn:
        for statement in SEED:
            conn.execute(statement, {"n": n, "now": time.time()})  # type: ignore[arg-type]
        conn.execute("ANALYZE")
    return time.perf_counter() - started


def timed(fn: Callable[[], httpx.Response], repeat: int) -> dict[str, float]:
    fn().raise_for_status()  # the warm-up (templates compiled, pool connections open)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        answer = fn()
        times.append((time.perf_counter() - started) * 1000.0)
        answer.raise_for_status()
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 2),
        "bytes": len(answer.content),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 devices, 5 requests")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30, help="requests per page")
    parser.add_argument("--browser-runs", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true", help="server leg only")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.repeat, args.browser_runs = 1000, 5, 1
    out: dict[str, Any] = {"benchmark": "dashboard", "devices": args.devices,
                           "seeded": "devices, heartbeats, chains, commands by SQL; the "
                           "rollout by the API, its device statuses by SQL"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, scratch_database() as db:
        work = Path(tmp)
        with cloud_server(db, work) as url:
            token = admin_token(db, work)
            out["seed_s"] = round(seed(db, args.devices), 2)
            bearer = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, timeout=60) as http:
                body = {"content": {"risk": {"floor_limit_minor": 3000}}, "target": {"all": True},
                        "waves": ["10%", "50%", "100%"]}  # fmt: skip
                made = http.post("/api/v1/config/rollout", json=body, headers=bearer)
                made.raise_for_status()
                rollout_id = made.json()["rollout_id"]
                with psycopg.connect(db, autocommit=True) as conn:
                    for statement in SPREAD:
                        params = {"now": time.time(), "rollout_id": rollout_id}
                        conn.execute(statement, params)  # type: ignore[arg-type]
                login = http.post("/ui/login", data={"token": token})
                if login.status_code != 303:
                    raise SystemExit(f"login refused: {login.status_code} {login.text[:200]}")
                pages = {
                    "fleet": "/ui/fleet",
                    "fleet_store": "/ui/fleet?store=store-042",
                    "rollouts": "/ui/rollouts",
                    "rollout": f"/ui/rollouts/{rollout_id}",
                    "rollout_live": f"/ui/rollouts/{rollout_id}/live",
                    "device": "/ui/devices/dev-00001",
                    "audit": "/ui/audit?verify=cloud",
                }
                print(f"server: {len(pages)} pages x {args.repeat}...", file=sys.stderr)
                out["baseline"] = timed(
                    lambda: http.get("/api/v1/devices?limit=50", headers=bearer), args.repeat
                )
                server = out["server"] = {}
                for name, path in pages.items():
                    server[name] = timed(lambda p=path: http.get(p), args.repeat)  # type: ignore[misc]
                base = out["baseline"]["median_ms"]
                out["ratio"] = {k: round(v["median_ms"] / base, 2) for k, v in server.items()}
            if not args.no_browser:
                from hwsim.screenshots import capture

                print(f"chromium: {args.browser_runs} run(s)...", file=sys.stderr)
                runs: dict[str, list[float]] = {}
                for n in range(args.browser_runs):
                    for shot in capture(url, token, work / f"shots{n}", [rollout_id], "dev-00001"):
                        name = "rollout" if shot["page"].startswith("rollout-") else shot["page"]
                        runs.setdefault(name, []).append(shot["load_ms"])
                out["chromium_load_ms"] = {
                    k: round(statistics.median(v), 1) for k, v in runs.items()
                }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
