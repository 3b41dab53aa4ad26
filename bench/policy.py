"""Fraud-policy evaluation latency: ``CompiledPolicy.evaluate`` on a 100-rule policy.

    python bench/policy.py [--quick] [--evals N] [--seed S]

Builds a 100-rule policy mixing every rule type the way an acquirer's would (many MCC
and BIN blocks, a few amount ladders and velocity steps, night windows, five hot lists,
one of them 1,000 keyed hashes; each list counts as one rule), and random transactions
of which most are approved and a few percent hit one or more rules.

Each call is timed on its own with ``time.perf_counter_ns`` (one clock read before and
one after, so every sample includes one timer overhead). The baseline is the same timed
loop around an empty ``lambda txn: None``, interleaved with the policy in rounds so both
see the same machine; ``ratio_p50``/``ratio_p99`` divide the policy's figure by the
baseline's. ``evals_per_s`` comes from an untimed loop over the same transactions, with
the empty call's rate beside it. GC stays enabled, as in production.

Prints one JSON object on stdout. Target: p99 <= 50 us.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `edge` importable
    sys.path.insert(0, str(ROOT))

from edge.terminal.sale.policy import (  # noqa: E402
    PolicyDocument,
    Txn,
    compile_policy,
)

DEFAULT_EVALS = 200_000
QUICK_EVALS = 20_000
WARMUP_EVALS = 5_000
#: Policy and baseline alternate this many times, so drift on a noisy machine hits both.
ROUNDS = 10
TARGET_P99_US = 50.0
RULES = 100
#: Rules per type: 8 + 20 + 2 + 6 + 14 + 45 + 5 = 100.
MIX = {
    "amount_over": 8,
    "bin_block": 20,
    "bin_allow": 2,
    "velocity": 6,
    "time_of_day": 14,
    "mcc_block": 45,
    "hot_list": 5,
}
HOT_LIST_SIZES = (1000, 200, 100, 50, 50)
VELOCITY_WINDOW_S = 600
CURRENCIES = ("EUR", "USD", "GBP")


def build_policy(rng: random.Random) -> PolicyDocument:
    rules: list[dict[str, Any]] = []
    actions = ("decline", "online", "review")
    for i in range(MIX["amount_over"]):  # a ladder: online, then review, then decline
        rule = {"max_minor": (i % 3 + 1) * 25_000, "action": ("online", "review", "decline")[i % 3]}
        if i >= 3:
            rule["currency"] = CURRENCIES[i % 3]
        rules.append({"id": f"amount-{i}", "type": "amount_over", **rule})
    for i in range(MIX["bin_block"]):
        bins = [_bin(rng, rng.choice((6, 6, 7, 8))) for _ in range(rng.randint(3, 10))]
        rules.append({"id": f"bin-block-{i}", "type": "bin_block", "bins": bins})
    # Domestic BIN ranges (a foreign card goes online), and a wider list of the card
    # ranges the terminal accepts at all (anything else is reviewed).
    domestic = [f"4{rng.randrange(10**5):05d}" for _ in range(300)]
    domestic += [f"5{rng.randrange(10**7):07d}" for _ in range(100)]
    accepted = domestic + [_bin(rng, 6) for _ in range(200)]
    for i, (bins, action) in enumerate([(domestic, "online"), (accepted, "review")]):
        rules.append({"id": f"allow-{i}", "type": "bin_allow", "bins": bins, "action": action})
    for i in range(MIX["velocity"]):
        rules.append(
            {
                "id": f"velocity-{i}",
                "type": "velocity",
                "max_count": 4 + 2 * i,
                "window_s": VELOCITY_WINDOW_S,
                "action": actions[i % 3],
            }
        )
    for i in range(MIX["time_of_day"]):
        start = rng.randrange(24 * 60)
        end = (start + rng.randint(5, 20)) % (24 * 60)  # narrow: ~12% of the day
        rules.append(
            {
                "id": f"hours-{i}",
                "type": "time_of_day",
                "start": f"{start // 60:02d}:{start % 60:02d}",
                "end": f"{end // 60:02d}:{end % 60:02d}",
                "action": "review",
            }
        )
    for i in range(MIX["mcc_block"]):
        mccs = [f"{rng.randrange(4000, 8000):04d}" for _ in range(rng.randint(1, 4))]
        rules.append({"id": f"mcc-{i}", "type": "mcc_block", "mccs": mccs, "action": "decline"})
    for i, size in enumerate(HOT_LIST_SIZES):
        hashes = [rng.randbytes(32).hex() for _ in range(size)]
        rules.append({"id": f"hot-{i}", "type": "hot_list", "pan_hashes": hashes})
    assert len(rules) == RULES
    rng.shuffle(rules)
    return PolicyDocument.model_validate({"version": 1, "name": "bench", "rules": rules})


def _bin(rng: random.Random, digits: int) -> str:
    return f"{rng.choice('3456')}{rng.randrange(10 ** (digits - 1)):0{digits - 1}d}"


def make_txns(doc: PolicyDocument, n: int, rng: random.Random) -> list[Txn]:
    """Mostly clean domestic traffic; a few percent are foreign, or carry a blocked BIN or
    MCC, a hot PAN hash, a burst on one card, a large amount, or fall in a night window."""
    domestic = next(r.bins for r in doc.rules if r.id == "allow-0")
    blocked_bins = [b for r in doc.rules if r.type == "bin_block" for b in r.bins]
    blocked_mccs = [m for r in doc.rules if r.type == "mcc_block" for m in r.mccs]
    hot = [h for r in doc.rules if r.type == "hot_list" for h in r.pan_hashes]
    clean_mccs = ["5411", "5812", "5814", "5541", "5912", "5999", "4121", "5311"]
    txns = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.02:
            bin_ = rng.choice(blocked_bins)
        elif roll < 0.07:
            bin_ = _bin(rng, rng.choice((6, 8)))  # foreign
        else:
            bin_ = rng.choice(domestic)
        txns.append(
            Txn(
                amount_minor=int(rng.lognormvariate(7.5, 1.2)),
                currency=rng.choices(CURRENCIES, weights=(8, 1, 1))[0],
                bin6=bin_,
                pan_hash=rng.choice(hot) if rng.random() < 0.01 else rng.randbytes(32).hex(),
                mcc=rng.choice(blocked_mccs) if rng.random() < 0.02 else rng.choice(clean_mccs),
                local_minute=rng.randrange(24 * 60),
                card_recent_count=min(int(rng.expovariate(1.0)), 30),
            )
        )
    return txns


def timed(fn: Callable[[Txn], object], txns: Sequence[Txn], out: list[int]) -> None:
    clock = time.perf_counter_ns
    append = out.append
    for txn in txns:
        t0 = clock()
        fn(txn)
        append(clock() - t0)


def rate(fn: Callable[[Txn], object], txns: Sequence[Txn]) -> float:
    t0 = time.perf_counter_ns()
    for txn in txns:
        fn(txn)
    return len(txns) / ((time.perf_counter_ns() - t0) / 1e9)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {
        "p50_us": round(at(0.50), 3),
        "p99_us": round(at(0.99), 3),
        "max_us": round(ordered[-1] / 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EVALS} evaluations")
    parser.add_argument("--evals", type=int, help=f"evaluations (default {DEFAULT_EVALS})")
    parser.add_argument("--seed", type=int, default=20240601, help="random seed")
    args = parser.parse_args(argv)
    evals = args.evals or (QUICK_EVALS if args.quick else DEFAULT_EVALS)
    if evals < ROUNDS * 100:
        parser.error(f"--evals must be at least {ROUNDS * 100}")
    started = time.perf_counter()
    rng = random.Random(args.seed)

    doc = build_policy(rng)
    t0 = time.perf_counter_ns()
    compiled = compile_policy(doc)
    compile_ms = (time.perf_counter_ns() - t0) / 1e6
    txns = make_txns(doc, evals, rng)
    evaluate = compiled.evaluate

    def empty(txn: Txn) -> None:
        return None

    warm = txns[:WARMUP_EVALS]
    timed(evaluate, warm, [])
    timed(empty, warm, [])

    policy_ns: list[int] = []
    baseline_ns: list[int] = []
    chunk = len(txns) // ROUNDS
    for r in range(ROUNDS):
        part = txns[r * chunk : (r + 1) * chunk]
        timed(empty, part, baseline_ns)
        timed(evaluate, part, policy_ns)

    evals_per_s = rate(evaluate, txns)
    empty_per_s = rate(empty, txns)
    decisions = Counter(evaluate(t).action for t in txns)
    policy = percentiles(policy_ns)
    baseline = percentiles(baseline_ns)
    out = {
        "benchmark": "policy",
        "quick": bool(args.quick),
        "rules": len(doc.rules),
        "rule_mix": MIX,
        "hot_list_sizes": list(HOT_LIST_SIZES),
        "evals": len(policy_ns),
        "timing": "perf_counter_ns around each call; samples include one clock read",
        **policy,
        "evals_per_s": round(evals_per_s),
        "baseline": {
            "what": "the same timed loop around an empty `lambda txn: None` call",
            **baseline,
            "calls_per_s": round(empty_per_s),
        },
        "ratio_p50": round(policy["p50_us"] / baseline["p50_us"], 2),
        "ratio_p99": round(policy["p99_us"] / baseline["p99_us"], 2),
        "net_p50_us": round(policy["p50_us"] - baseline["p50_us"], 3),
        "decisions": {a: decisions.get(a, 0) for a in ("approve", "online", "review", "decline")},
        "compile_ms": round(compile_ms, 2),
        "target": {"p99_us": f"<= {TARGET_P99_US:g}"},
        "meets_target": policy["p99_us"] <= TARGET_P99_US,
        "env": {"python": platform.python_version(), "machine": platform.machine()},
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
