"""``make torture N=…``: kill -9 and power-cut torture of a terminal, with a tally.

    python -m hwsim.torture [--kills N] [--cuts N] [--seed S] [--sweeps] [--workdir DIR]

Runs ``hwsim.killtorture.run`` (the daemon as a subprocess under payment load, SIGKILLed
at random moments and restarted) and ``hwsim.cuttorture.run`` (power cut at a random
write/sync of the database, reboot, recovery), then with ``--sweeps`` the deterministic
per-event sweeps of one payment, one refund, one saga rollback and one payment whose
approval's answer is lost before an outage. Both tortures include that fault: an answer
lost at the acquirer, then an outage longer than every authorisation retry. After each
kill and cut the invariants are checked (integrity, each approval exactly once, nothing
approved missing from the outbox, every run finished after recovery, the audit chain,
no money held at the acquirer without an approved run or a pending reversal).

Prints one JSON tally on stdout (progress on stderr) and exits 1 if any invariant was
violated; the working directories of failed lives are kept for a post-mortem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hwsim.torture", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kills", type=int, default=200, help="kill -9 cycles (0: none)")
    parser.add_argument("--cuts", type=int, default=500, help="random power cuts (0: none)")
    parser.add_argument("--seed", type=int, default=1, help="seed of both runs")
    parser.add_argument("--sweeps", action="store_true", help="also the per-event sweeps")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temp)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.cuts < 0:
        parser.error("--kills and --cuts must be 0 or more")
    # Declines and jams log a warning per run: thousands of lines would bury the tally.
    logging.basicConfig(level=logging.ERROR)
    log = None if args.quiet else _progress

    with tempfile.TemporaryDirectory(prefix="tf-torture-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tally: dict[str, Any] = {"seed": args.seed}
        if args.kills:
            from hwsim import killtorture

            tally["kill"] = killtorture.run(
                args.kills, seed=args.seed, workdir=root / "kill", log=log
            )
        if args.cuts:
            from hwsim import cuttorture

            tally["power"] = cuttorture.run(
                args.cuts, seed=args.seed, workdir=root / "power", log=log
            )
        if args.sweeps:
            from hwsim import cuttorture

            tally["sweeps"] = {
                f"{scenario}{'-torn' if tear else ''}": cuttorture.sweep(
                    scenario, workdir=root / f"sweep-{scenario}-{tear}", tear=tear, log=log
                )
                for scenario in sorted(cuttorture.SCENARIOS)
                for tear in (False, True)
            }
        violations = [
            *tally.get("kill", {}).get("violations", []),
            *tally.get("power", {}).get("violations", []),
            *(v for s in tally.get("sweeps", {}).values() for v in s["violations"]),
        ]
        tally["violations_total"] = len(violations)
        tally["seconds"] = round(time.perf_counter() - started, 1)
        if violations and args.workdir is None:
            kept = Path(tempfile.mkdtemp(prefix="tf-torture-failed-"))
            for child in root.iterdir():
                child.rename(kept / child.name)
            tally["kept"] = str(kept)
        print(json.dumps(tally, indent=2, default=str))
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
