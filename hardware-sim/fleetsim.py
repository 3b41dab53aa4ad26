"""``make fleet N=10000 SEED=1``: a fleet of N real terminals against the real control
plane, through a trading day and three rollouts, then reconciled.

The terminals are ``hwsim.fleetshard``'s: each a real ``Terminal`` (its own SQLite
database, the payment workflows) with the real sync client, simulated card reader,
printer, acquirer and network link, spread over ``--processes`` processes (about one per
core). The cloud is ``hwsim.cloudrig``'s: ``tillflow cloud serve`` (two processes) and
two Celery workers on PostgreSQL (``--database-url``/``TILLFLOW_DATABASE_URL``, else an
embedded one) and a broker (``--broker-url``/``TILLFLOW_BROKER_URL``, e.g. Redis, else
the serverless one).

Virtual time: the day is ``hours`` hours of trading; a terminal syncs once per sync
interval (a "round": every terminal whose link is up syncs once), every four hours of the
day and once per round while a rollout runs. What the cloud times (a rollout's soak,
its 10 s poll, a device's timeout) is wall-clock and short here. The scenario:

1. enroll every terminal but the late joiners (one-time tokens through the Fleet API);
   config version 1 (floor limit 25.00 EUR) is assigned to the fleet;
2. the trading day: payments online and offline (flaky links, a store outage, 0.3% of
   terminals offline from hour 3 on, for hours), refunds, voids; settlement at its end;
3. a ConfigRollout whose floor limit jams the XR-7's printer: waves 1%, 10%, 100%; the
   1% canary is too small to judge (``min_sample``: 1.5% of the fleet), wave 2 passes the
   5% failure threshold, and the saga restores every terminal that applied it;
4. the late joiners enroll; a ConfigRollout every model takes (waves 10%, 100%), during
   which one Celery worker and one API process are killed with SIGKILL and restarted;
5. a PolicyRollout (waves 10%, 100%);
6. the network heals: every terminal syncs until nothing is left to send;
7. reconciliation: ``tillflow cloud reconcile`` holds each terminal's own account
   against the cloud (every approved sale there exactly once, no sale unknown to its
   terminal, every message once, every outbox drained, every audit chain verified to the
   terminal's head, nothing quarantined), and the terminals' own databases are asked
   which config and policy are in force (the expected ones; each terminal that applied
   the bad config restored).

The exit status is 0 when every check holds, 4 when one does not (each named). It
writes ``report.json`` and ``report.html`` (``hwsim.fleetreport``) in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwsim import fleetstats
from hwsim.cloudrig import CloudRig, FleetApi
from hwsim.fleetshard import XR7_JAMS_ABOVE, FleetPlan, serve

DATABASE_URL_ENV = "TILLFLOW_DATABASE_URL"
BROKER_URL_ENV = "TILLFLOW_BROKER_URL"
EXIT_VIOLATION = 4
BASELINE_FLOOR, BAD_FLOOR, GOOD_FLOOR = 2_500, 9_000, 3_000
assert BAD_FLOOR > XR7_JAMS_ABOVE >= GOOD_FLOOR
POLICY = {"rules": [{"id": "big", "type": "amount_over", "max_minor": 150_000,
                     "action": "online"}]}  # fmt: skip
FINISHED = ("succeeded", "rolled_back", "failed")
#: The rollouts' options: seconds are wall-clock (see the module doc).
SOAK_S = 5
FAILURE_PERCENT = 5
#: A round (one sync interval) takes at least this long on the wall clock: a small
#: fleet's rounds would otherwise spin while the cloud's timers run.
MIN_ROUND_S = 2.0


def _config(floor_minor: int) -> dict[str, Any]:
    return {"risk": {"floor_limit_minor": floor_minor}}


class FleetSimError(RuntimeError):
    pass


# --- the shard processes ---------------------------------------------------------------


class Shards:
    """The shard processes; ``call`` sends one call to each and waits for all."""

    def __init__(self, plan: FleetPlan, work: Path, urls: list[str], api_url: str,
                 token: str, epoch: float) -> None:  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        plan_dict = asdict(plan)
        for i in range(plan.shards):
            parent, child = ctx.Pipe()
            args = {"plan": plan_dict, "shard": i, "work": str(work / f"shard{i}"),
                    "urls": urls, "api_url": api_url, "api_token": token,
                    "epoch": epoch}  # fmt: skip
            p = ctx.Process(target=serve, args=(child, args), name=f"fleet-shard-{i}",
                            daemon=True)  # fmt: skip
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def call(self, method: str, **kwargs: Any) -> list[Any]:
        for c in self.conns:
            c.send((method, kwargs))
        out = []
        for i, c in enumerate(self.conns):
            try:
                status, result = c.recv()
            except EOFError:
                raise FleetSimError(f"shard {i} died during {method}") from None
            if status != "ok":
                raise FleetSimError(f"shard {i}, {method}: {result}")
            out.append(result)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("close")
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# --- the console's progress bar ---------------------------------------------------------


class Progress:
    """One line on a terminal (redrawn twice a second), a line every 15 s elsewhere."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.phase, self.done, self.detail = "starting", 0, ""
        self._stop = threading.Event()
        self._last_line = 0.0
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def set(
        self, phase: str | None = None, done: int | None = None, detail: str | None = None
    ) -> None:
        changed = phase is not None and phase != self.phase
        if phase is not None:
            self.phase = phase
        if done is not None:
            self.done = done
        if detail is not None:
            self.detail = detail
        if changed and not self.tty:
            self._draw(force=True)

    def line(self) -> str:
        width = 24
        filled = min(width, round(width * self.done / max(1, self.total)))
        bar = "#" * filled + "-" * (width - filled)
        took = time.monotonic() - self.started
        return (f"[{took:6.0f}s] {self.phase:<22} [{bar}] {self.done:>6,}/{self.total:,} "
                f"{self.detail}")  # fmt: skip

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line()[:160].ljust(160))
        elif force or now - self._last_line >= 15:
            self.stream.write(self.line() + "\n")
        else:
            return
        self._last_line = now
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def say(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.tty:
            self.stream.write("\n")


# --- the scenario ----------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


class Scenario:
    """The run (see the module doc); ``run()`` the report, as a dict."""

    def __init__(self, plan: FleetPlan, work: Path, database_url: str, broker_url: str,
                 *, serves: int = 2, workers: int = 2, progress: Progress | None = None,
                 kill: bool = True, out: Path | None = None) -> None:  # fmt: skip
        self.plan, self.work = plan, Path(work)
        self.out = out
        self.database_url, self.broker_url = database_url, broker_url
        self.serves, self.workers, self.kill = serves, workers, kill
        self.progress = progress or Progress(plan.terminals, stream=open(os.devnull, "w"))  # noqa: SIM115
        self.epoch = time.time()
        self.t0 = time.monotonic()
        self.phases: list[Phase] = []
        self.rollouts: list[dict[str, Any]] = []
        self.requests: list[tuple[float, float, int]] = []
        self.events: list[dict[str, Any]] = []
        self.cpu = fleetstats.CpuLedger()
        self.peak_rss: dict[str, float] = {}
        self.rounds = 0
        self.round_s: list[float] = []
        self.rig: CloudRig | None = None
        self.shards: Shards | None = None
        self.api: FleetApi | None = None

    def now_s(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def event(self, what: str) -> None:
        self.events.append({"t_s": self.now_s(), "what": what})
        self.progress.say(f"  {self.now_s():7.1f}s  {what}")

    # --- bookkeeping -------------------------------------------------------------------

    def _sample(self) -> dict[str, float]:
        """CPU seconds so far of every process (shards, serves, workers, PostgreSQL)."""
        for p in [*self.rig.serves, *self.rig.workers] if self.rig is not None else []:
            if p.pid is not None and p.alive():
                self.cpu.see(p.name, p.pid, self.rig.cpu_s(p.name))
                rss = self.rig.rss_mib(p.name)
                self.peak_rss[p.name] = max(self.peak_rss.get(p.name, 0.0), rss)
        pg_cpu, pg_rss = fleetstats.postgres_usage(self.database_url)
        self.cpu.set("postgres", pg_cpu)
        self.peak_rss["postgres"] = max(self.peak_rss.get("postgres", 0.0), pg_rss)
        if self.shards is not None:
            for i, p in enumerate(self.shards.procs):
                cpu, rss = fleetstats.process_usage(p.pid)
                self.cpu.see(f"shard-{i}", p.pid, cpu)
                self.peak_rss[f"shard-{i}"] = max(self.peak_rss.get(f"shard-{i}", 0.0), rss)
        self.cpu.see("coordinator", os.getpid(), time.process_time())
        return self.cpu.totals()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.progress.set(phase=name)
        ph = Phase(name, self.now_s())
        before = self._sample()
        try:
            yield
        finally:
            after = self._sample()
            ph.end_s = self.now_s()
            ph.cpu = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}
            self.phases.append(ph)

    def _drain_requests(self) -> None:
        assert self.shards is not None
        for part in self.shards.call("take_requests"):
            self.requests.extend(tuple(r) for r in part)

    def round(self) -> dict[str, int]:
        """One sync interval of the fleet."""
        assert self.shards is not None
        started = time.monotonic()
        parts = self.shards.call("round")
        took = time.monotonic() - started
        self.round_s.append(round(took, 2))
        if took < MIN_ROUND_S:
            time.sleep(MIN_ROUND_S - took)
        self.rounds += 1
        self._drain_requests()
        self._sample()
        syncs = sum(p["syncs"] for p in parts)
        failed = sum(p["failed"] for p in parts)
        self.progress.set(
            done=syncs, detail=f"round {self.rounds}: {syncs:,} synced, {failed:,} failed"
        )
        return {"syncs": syncs, "failed": failed}

    # --- the steps ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            with self.phase("cloud start"):
                self.rig = CloudRig(self.database_url, self.broker_url, self.work / "cloud",
                                    settings={"sweep_interval_s": 2.0,
                                              "broker_url": self.broker_url or None})  # fmt: skip
                stack.callback(self.rig.stop)
                self.rig.start(serves=self.serves, workers=self.workers)
                token = self.rig.admin_token()
                self.api = self.rig.fleet()
                stack.callback(self.api.close)
            self.event(f"cloud up: {self.serves} serve(s) at {', '.join(self.rig.urls)}, "
                       f"{self.workers} worker(s)")  # fmt: skip
            with self.phase("make terminals"):
                self.shards = Shards(self.plan, self.work / "fleet", self.rig.urls, self.rig.url,
                                     token, self.epoch)  # fmt: skip
                stack.callback(self.shards.close)
                made = self.shards.call("make")
            n = sum(m["terminals"] for m in made)
            self.progress.set(done=n)
            self.event(f"{n:,} terminals made in {self.plan.shards} processes")
            self.enroll()
            self.day()
            bad = self.bad_rollout()
            self.good = good = self.good_rollout()
            self.policy = policy = self.policy_rollout()
            self.heal()
            report = self.reconcile(bad, good, policy)
            if self.out is not None:  # while the cloud still runs
                report["screenshots"] = fleetstats.screenshots(self, self.out)
            return report
        raise AssertionError("unreachable")

    def enroll(self) -> None:
        assert self.shards is not None and self.api is not None
        with self.phase("enroll"):
            v1 = int(self.api.post("/api/v1/documents/config",
                                   {"content": _config(BASELINE_FLOOR)})["version"])  # fmt: skip
            self.api.post("/api/v1/documents/config/assignments", {"version": v1, "scope": "fleet"})
            self.baseline = v1
            done = sum(p["enrolled"] for p in self.shards.call("enroll", late=False))
            self.progress.set(done=done)
        self.event(f"{done:,} enrolled; config v{v1} (floor {BASELINE_FLOOR / 100:.2f} EUR) "
                   "assigned to the fleet")  # fmt: skip

    def day(self) -> None:
        assert self.shards is not None
        totals: dict[str, int] = {}
        with self.phase("trading day"):
            for h in range(self.plan.hours):
                for part in self.shards.call("hour", hour=h):
                    for k, v in part.items():
                        totals[k] = totals.get(k, 0) + v if k != "down" else v
                self.progress.set(detail=f"hour {h + 1}/{self.plan.hours}: "
                                  f"{totals.get('payments', 0):,} payments")  # fmt: skip
                if h % self.plan.sync_every_hours == self.plan.sync_every_hours - 1:
                    self.round()
            totals["settlements"] = sum(p["settlements"] for p in self.shards.call("settle"))
            self.round()
        self.day_totals = totals
        self.day_distributions = self.distributions()
        self.event(
            f"trading day: {totals.get('payments', 0):,} payments ({totals.get('approved', 0):,} "
            f"approved, {totals.get('offline', 0):,} offline), {totals.get('refunds', 0):,} "
            f"refunds, {totals.get('voids', 0):,} voids, settlements"
        )

    def distributions(self) -> dict[str, list[float]]:
        assert self.shards is not None
        merged: dict[str, list[float]] = {}
        for part in self.shards.call("distributions"):
            for k, v in part.items():
                merged.setdefault(k, []).extend(v)
        return merged

    @property
    def device_timeout_s(self) -> int:
        """A device's time to answer: an online one has its command within two rounds of
        the broadcast (the round it was sent in may have passed it already) and sends its
        result at once; its healthy heartbeat comes the round after the soak. So three
        rounds of the usual length, the soak and a margin; a device offline for hours
        holds each wave it is in this long, then counts as timed out."""
        rounds = sorted(self.round_s) or [MIN_ROUND_S]
        usual = rounds[len(rounds) // 2]
        return int(max(30.0, 3 * usual + SOAK_S + 15))

    def abort(self, judged_from: float) -> dict[str, Any]:
        """Abort past ``FAILURE_PERCENT``, judged once ``judged_from`` of the fleet has an
        outcome (the 1% canary of the bad rollout is too small to judge: its wave 2 is
        where the verdict falls)."""
        n = max(3, round(judged_from * self.plan.terminals))
        return {"failure_percent": FAILURE_PERCENT, "min_sample_wave": n, "min_sample_total": n}

    def rollout(self, kind: str, name: str, body: dict[str, Any], expect: str,
                during: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
        """Start a rollout, sync the fleet round by round until it ends (and its
        rollback settled), sampling its view after each round."""
        assert self.api is not None and self.shards is not None
        with self.phase(f"{name}"):
            v = self.api.post(f"/api/v1/{kind}/rollout", body)
            rid = v["rollout_id"]
            rec: dict[str, Any] = {"id": rid, "kind": kind, "name": name, "expected": expect,
                                   "failure_percent": body["abort"]["failure_percent"],
                                   "samples": [], "started_s": self.now_s()}  # fmt: skip
            self.rollouts.append(rec)
            self.event(f"{name}: rollout {rid} started ({', '.join(body['waves'])})")
            deadline = time.monotonic() + 60 + 10 * len(body["waves"]) * body["device_timeout_s"]
            n = 0
            while True:
                # one round is one virtual hour of links: the flaky ones flap
                self.shards.call("links", hour=self.plan.hours + self.rounds)
                self.round()
                n += 1
                if during is not None:
                    during(n)
                v = self.api.get(f"/api/v1/rollouts/{rid}")
                rec["samples"].append(fleetstats.rollout_sample(self.now_s(), v))
                wave = v["current_wave"]
                self.progress.set(detail=f"{name}: {v['status']}, wave {wave}, "
                                  f"{sum(w['healthy'] for w in v['waves']):,} healthy")  # fmt: skip
                if v["status"] in FINISHED and (v["rollback"] or {}).get("pending", 0) == 0:
                    break
                if time.monotonic() > deadline:
                    raise FleetSimError(f"{name}: rollout {rid} not finished ({v['status']})")
            rec.update(status=v["status"], ended_s=self.now_s(), view=v,
                       waves=[{"index": w["wave"], "size": w["targeted"]} for w in v["waves"]],
                       abort=None if v["abort"] is None else {
                           **v["abort"], "reason": fleetstats.abort_reason(v["abort"]),
                           "at_s": round(float(v["abort"].get("at") or time.time())
                                         - self.epoch, 2)})  # fmt: skip
        self.event(f"{name}: {v['status']} after {rec['ended_s'] - rec['started_s']:.0f} s "
                   f"({self.rounds} rounds so far)")  # fmt: skip
        return rec

    def bad_rollout(self) -> dict[str, Any]:
        body = {"content": _config(BAD_FLOOR), "target": {"all": True},
                "waves": ["1%", "10%", "100%"], "soak_s": SOAK_S, "abort": self.abort(0.015),
                "device_timeout_s": self.device_timeout_s, "seed": self.plan.seed,
                "reason": "fleetsim: a floor limit the XR-7 cannot take"}  # fmt: skip
        rec = self.rollout("config", "bad config", body, "rolled_back")
        assert self.api is not None
        rec["devices"] = list(self.api.pages(f"/api/v1/rollouts/{rec['id']}/devices"))
        return rec

    def good_rollout(self) -> dict[str, Any]:
        assert self.shards is not None
        with self.phase("late joiners"):
            late = sum(p["enrolled"] for p in self.shards.call("enroll", late=True))
        self.event(f"{late} late joiner(s) enrolled")

        def chaos(n: int) -> None:
            """After the rollout's first round: SIGKILL a worker and an API process
            (the second, if there are two); after the next, start both again."""
            if not self.kill or self.rig is None:
                return
            victim = f"serve:{min(1, len(self.rig.serves) - 1)}"
            if n == 1:
                w, s = self.rig.kill9("worker:0"), self.rig.kill9(victim)
                self.event(f"kill -9: worker:0 (pid {w}) and {victim} (pid {s})")
            elif n == 2:
                self.rig.restart("worker:0")
                self.rig.restart(victim)
                self.event(f"worker:0 and {victim} restarted")

        body = {"content": _config(GOOD_FLOOR), "target": {"all": True},
                "waves": ["10%", "100%"], "soak_s": SOAK_S, "abort": self.abort(0.005),
                "device_timeout_s": self.device_timeout_s, "seed": self.plan.seed + 1,
                "reason": "fleetsim: a floor limit every model takes"}  # fmt: skip
        return self.rollout("config", "good config", body, "succeeded", during=chaos)

    def policy_rollout(self) -> dict[str, Any]:
        body = {"content": POLICY, "target": {"all": True}, "waves": ["10%", "100%"],
                "soak_s": SOAK_S, "abort": self.abort(0.005),
                "device_timeout_s": self.device_timeout_s,
                "seed": self.plan.seed + 2, "reason": "fleetsim: a fraud policy"}  # fmt: skip
        return self.rollout("policy", "policy", body, "succeeded")

    def heal(self) -> None:
        assert self.shards is not None
        with self.phase("heal"):
            self.shards.call("heal")
            self.event("the network heals: every link up")
            deadline = time.monotonic() + 120 + 4 * self.device_timeout_s
            # what the terminals should end on: the good config and the policy (a
            # rollout that did not succeed is a violation already: not waited for)
            want = {r["kind"]: r["view"]["document"]["version"] for r in (self.good, self.policy)
                    if r["status"] == "succeeded"}  # fmt: skip
            while True:
                self.round()
                behind = sum(p["pending"] for p in self.shards.call("pending"))
                versions = self.versions()
                off = [v for v in versions.values() if any(v[k] != n for k, n in want.items())]
                self.progress.set(detail=f"heal: {behind:,} with something unsent, "
                                  f"{len(off):,} not on the expected config")  # fmt: skip
                if not behind and not off:
                    self.round()  # the heartbeat after the last acknowledgement
                    break
                if time.monotonic() > deadline:
                    self.event(f"heal: still {behind} terminal(s) behind, {len(off)} off-version")
                    break
            self.shards.call("finish")
        self.end_distributions = self.distributions()

    def versions(self) -> dict[str, Any]:
        assert self.shards is not None
        merged: dict[str, Any] = {}
        for part in self.shards.call("versions"):
            merged.update(part)
        return merged

    # --- reconciliation ----------------------------------------------------------------

    def reconcile(
        self, bad: dict[str, Any], good: dict[str, Any], policy: dict[str, Any]
    ) -> dict[str, Any]:
        assert self.shards is not None and self.rig is not None
        with self.phase("reconcile"):
            accounts = [a for part in self.shards.call("accounts") for a in part]
            path = self.work / "accounts.jsonl"
            path.write_text("".join(json.dumps(a) + "\n" for a in accounts), encoding="utf-8")
            out = subprocess.run(
                [sys.executable, "-m", "edge.cli", "cloud", "reconcile", str(path), "--json",
                 "--database-url", self.database_url],
                capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            if out.returncode not in (0, EXIT_VIOLATION):
                raise FleetSimError(
                    f"tillflow cloud reconcile: exit {out.returncode}: {out.stderr}"
                )
            cloud = json.loads(out.stdout)
            checks = list(cloud["checks"])
            checks += fleetstats.terminal_checks(self.versions(), bad, good, policy, self.baseline)
            # from 1,000 terminals up, wave 2 (10%) holds enough XR-7s to judge
            wave = 2 if self.plan.terminals >= 1000 else None
            checks += fleetstats.rollout_checks([bad, good, policy], abort_wave=wave)
        ok = all(c["ok"] for c in checks)
        self.event("reconciliation: " + ("every check holds" if ok else "VIOLATIONS: " + "; ".join(
            c["name"] for c in checks if not c["ok"])))  # fmt: skip
        return self.report(ok, checks, len(accounts))

    def report(self, ok: bool, checks: list[dict[str, Any]], accounts: int) -> dict[str, Any]:
        assert self.shards is not None
        measures = self.shards.call("measure")
        wall = self.now_s()
        return fleetstats.report(
            plan=self.plan, wall_s=wall, ok=ok, checks=checks,
            phases=[asdict(p) for p in self.phases],
            rollouts=self.rollouts, requests=self.requests, cpu=self.cpu.totals(),
            peak_rss=self.peak_rss, measures=measures, events=self.events,
            day=self.day_distributions, end=self.end_distributions, day_totals=self.day_totals,
            started_at=self.epoch, accounts=accounts, rounds=self.rounds,
        )  # fmt: skip


# --- the command ------------------------------------------------------------------------


@contextlib.contextmanager
def _database(url: str | None, work: Path, say: Callable[[str], None]) -> Iterator[str]:
    if url:
        yield url
        return
    from hwsim import clouddemo

    with clouddemo.control_plane_database(work, say) as (found, said):
        say(said)
        yield found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hwsim.fleetsim",
        description="A simulated fleet of real terminals against the real control plane: "
        "enroll, a trading day, a failing config rollout rolled back in wave 2, a good one "
        "(with a worker and an API process killed), a policy rollout, heal, reconcile. "
        "Exit 0: every reconciliation check held; 4: one did not (named).",
    )
    p.add_argument("--terminals", "-n", type=int, default=1000, help="fleet size (1000)")
    p.add_argument("--seed", type=int, default=1, help="the seed every draw comes from (1)")
    p.add_argument(
        "--processes",
        type=int,
        default=max(1, min(4, os.cpu_count() or 2)),
        help="processes the terminals are spread over (about one per core)",
    )
    p.add_argument("--hours", type=int, default=8, help="hours in the trading day (8)")
    p.add_argument(
        "--sales", type=float, default=1.5, help="payments per terminal per day, on average (1.5)"
    )
    p.add_argument("--threads", type=int, default=6, help="threads per process (6)")
    p.add_argument("--serves", type=int, default=2, help="API processes (2)")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (2)")
    p.add_argument("--no-kill", action="store_true", help="do not kill -9 a worker and a serve")
    p.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help=f"a fresh PostgreSQL database (default ${DATABASE_URL_ENV}, else embedded)",
    )
    p.add_argument(
        "--broker-url",
        default=os.environ.get(BROKER_URL_ENV),
        help=f"the Celery broker (default ${BROKER_URL_ENV}, else the serverless one)",
    )
    p.add_argument("--out", default="build/fleet", help="where report.json/.html go (build/fleet)")
    p.add_argument("--work", help="where the terminals' databases go (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds as Ctrl-C does: the cloud's processes, which
    # run in sessions of their own, are stopped, not left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fleetsim-"))
    plan = FleetPlan(terminals=a.terminals, seed=a.seed, shards=a.processes, hours=a.hours,
                     sales_per_terminal=a.sales, threads=a.threads)  # fmt: skip
    progress = Progress(a.terminals)
    progress.say(f"fleetsim: {a.terminals:,} terminals, seed {a.seed}, {a.processes} processes; "
                 f"work in {work}")  # fmt: skip
    try:
        with _database(a.database_url, work, progress.say) as db:
            scenario = Scenario(plan, work, db, a.broker_url or "", serves=a.serves,
                                workers=a.workers, progress=progress, kill=not a.no_kill,
                                out=out)  # fmt: skip
            report = scenario.run()
    finally:
        progress.close()
        if not a.keep and not a.work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    html = fleetstats.render_html(report, out)
    print(fleetstats.summary(report))
    print(f"report: {out / 'report.json'}" + (f", {html}" if html else ""))
    return 0 if report["scenario"]["ok"] else EXIT_VIOLATION


if __name__ == "__main__":
    raise SystemExit(main())
