"""``make demo``: the bundled payment workflow, end to end on SQLite, told in plain words.

Four runs on one database file in a temporary directory:
  1. a payment that completes, and the same request sent again (no second charge);
  2. a payment whose receipt printer is jammed: retried, then rolled back (saga);
  3. a payment whose process is killed (SIGKILL) in the middle, then recovered;
  4. the audit log's hash chain verified at the end.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from edge.engine import Engine, InlineExecutor, RunView, Status, SystemClock
from edge.store.sqlite import SqliteStore

WORKFLOW = Path(__file__).with_name("payment.yaml")

STEP_WORDS = {
    "validate": "checked the request",
    "reserve_funds": "reserved the funds",
    "charge_card": "charged the card",
    "print_receipt": "printed the receipt",
    "record_sale": "recorded the sale for the cloud (outbox)",
    "reject": "rejected the payment",
}
UNDO_WORDS = {"charge_card": "refunded the card", "reserve_funds": "released the reservation"}


def say(text: str = "") -> None:
    print(
        textwrap.fill(
            text, width=88, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False
        )
        if text
        else ""
    )


def tell(view: RunView) -> None:
    for s in view.steps:
        if s.kind == "decision":
            say(f"   - decided: go to '{s.output.get('next')}'")
        elif s.kind == "step" and s.status == "COMPLETED":
            say(f"   - {STEP_WORDS.get(s.step_name, s.step)}")
        elif s.kind == "step" and s.status == "RETRYING":
            say(
                f"   - {s.step_name} failed ({s.error and s.error['message']}); "
                "will retry after a pause"
            )
        elif s.kind == "step" and s.status == "FAILED":
            say(f"   - {s.step_name} failed for good ({s.error and s.error['message']})")
        elif s.kind == "compensation" and s.status == "COMPLETED":
            say(f"   - undo: {UNDO_WORDS.get(s.step_name, 'compensated ' + s.step_name)}")
    say(f"   => status {view.run.status}")


def crash_child(db: str) -> None:
    """Run in a subprocess: start a payment and die by SIGKILL inside print_receipt."""
    store = SqliteStore(db)
    engine = Engine(store, InlineExecutor(), clock=SystemClock())
    engine.register(WORKFLOW)
    os.environ["TILLFLOW_DEMO_KILL_AT"] = "print_receipt"
    engine.start("demo_payment", {"amount": 4200, "currency": "EUR"}, idempotency_key="pos-0003")


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    if len(sys.argv) == 3 and sys.argv[1] == "--crash-child":
        crash_child(sys.argv[2])
        return 0
    tmp = tempfile.mkdtemp(prefix="tillflow-demo-")
    db = os.path.join(tmp, "terminal.db")
    store = SqliteStore(db)
    engine = Engine(store, InlineExecutor(), clock=SystemClock())
    wf = engine.register(WORKFLOW)
    say(f"Tillflow demo: a payment is a durable workflow, stored in SQLite at {db}")
    say(f"Workflow '{wf.workflow_type}' v{wf.version}: " + " -> ".join(wf.sequences[None]))
    say("Every step's outcome is committed in one transaction before the next step starts.")
    say()

    say("1. A customer pays 12.50 EUR.")
    run1 = engine.start(
        "demo_payment", {"amount": 1250, "currency": "EUR"}, idempotency_key="pos-0001"
    )
    tell(engine.show(run1))
    again = engine.start(
        "demo_payment", {"amount": 1250, "currency": "EUR"}, idempotency_key="pos-0001"
    )
    same = "the same run, so nothing was charged twice" if again == run1 else "A SECOND RUN (bug!)"
    say(f"   The POS app sends the same request again (key pos-0001): Tillflow returns {same}.")
    msgs = store.outbox()
    say(
        f"   Outbox for the cloud now holds {len(msgs)} message(s): "
        f"{msgs[0].topic} {msgs[0].payload}"
    )
    say()

    say("2. Next customer pays 7.00 EUR, but the receipt printer is jammed.")
    run2 = engine.start("demo_payment", {"amount": 700, "currency": "EUR", "printer": "jammed"})
    tell(engine.show(run2))
    say("   The saga undid the completed steps in reverse order: the customer is not charged.")
    say()

    say("3. A third payment of 42.00 EUR: the terminal process is killed (kill -9) while printing.")
    child = subprocess.run(
        [sys.executable, "-m", "edge.examples.demo", "--crash-child", db], check=False
    )
    killed = child.returncode == -signal.SIGKILL
    say(
        f"   The process died {'by SIGKILL' if killed else f'with code {child.returncode}'}. "
        "Restarting..."
    )
    restarted = Engine(SqliteStore(db), InlineExecutor(), clock=SystemClock())
    recovered = restarted.recover()
    say(f"   On start, recover() found {len(recovered)} run(s) in flight and resumed them:")
    run3 = restarted.start(
        "demo_payment", {"amount": 4200, "currency": "EUR"}, idempotency_key="pos-0003"
    )
    view3 = restarted.show(run3)
    tell(view3)
    charges = [s for s in view3.steps if s.step_name == "charge_card" and s.status == "COMPLETED"]
    say(
        f"   charge_card completed {len(charges)} time(s): it had committed before the crash, so "
        "recovery resumed at print_receipt instead of charging again."
    )
    say()

    report = restarted.verify_audit()
    say(f"4. The audit log is hash-chained; verifying it: {report}.")
    ok = (
        engine.get(run1).status is Status.COMPLETED
        and engine.get(run2).status is Status.ROLLED_BACK
        and view3.run.status is Status.COMPLETED
        and len(charges) == 1
        and report.ok
    )
    say()
    say(f"Inspect it yourself:  .venv/bin/tillflow show {run2} --db {db}")
    say("Everything behaved as described." if ok else "SOMETHING DID NOT BEHAVE AS DESCRIBED.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
