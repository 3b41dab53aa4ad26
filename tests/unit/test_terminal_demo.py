"""``make demo`` (``python -m hwsim.demo``): the simulated terminal's story runs end to end
and says so -- the daemon as a subprocess, the POS over its socket, the simulators --
then the control plane's (``hwsim.clouddemo``): an embedded PostgreSQL, enrollment,
sync through an outage, an operator command applied; then the rollouts'
(``hwsim.rolloutdemo``): eight simulated terminals on serve and a worker (a second
embedded PostgreSQL, the serverless broker), a config rolled back by saga past the
threshold, one that reaches every terminal (about 2 minutes in all)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: A subprocess demo (the daemon, the simulators, the POS): not in the fast tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_terminal_demo__tells_the_whole_story_exits_0_and_leaves_no_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
    env["PYTHONIOENCODING"] = "utf-8"
    env["TMPDIR"] = str(tmp_path)  # where its temporary directory goes
    proc = subprocess.run(
        [sys.executable, "-m", "hwsim.demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=360,
        check=False,
    )
    out = proc.stdout.decode("utf-8", errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode("utf-8", errors="replace")
    flat = " ".join(out.split())  # the narrative wraps lines anywhere between words
    for phrase in (
        "decision approved, channel online, auth code",  # 1. online
        "decision approved, channel offline",  # 2. offline within limits
        "reason offline_amount_cap",
        "reason floor_limit",
        "ROLLED_BACK, decision reversed",  # 3. printer jam: the saga reversed it
        "released the authorisation",
        "killed by signal 9",  # 4. kill -9, restart, recovery
        "recovered 1 run(s)",
        "1 charge for 50.00 EUR",
        # The acquirer's numbering: the reversal's number is skipped by the next auth code.
        "released the authorisation, answer 000003 (no auth code)",
        "the reversal took 000003, so the next auth code skips that number",
        "(Auth code 000004, not the next one: 000003 went to the reversal in 3.)",
        "outbox: 7 message(s)",  # 5. outbox and health
        "GET /v1/health: link up",
        "exited with code 0",  # 6. SIGTERM
        # 7. the control plane on an embedded PostgreSQL (no TILLFLOW_DATABASE_URL here)
        "no TILLFLOW_DATABASE_URL: using an embedded PostgreSQL at postgresql://",
        "tillflow cloud serve --port 0",
        "It enrolled as dev_",  # 8. enrollment, the outbox handed over
        "the outbox is empty and the offline exposure is released: 0.00 EUR",
        "-> COMPLETED, approved offline",  # 9. the outage, then the drain
        "Next sync: the 2 held message(s) reached the cloud",
        "--action request_health",  # 10. the operator command, applied
        "“command_applied” for it",
        "audit verify re-checks the chain: ok",
        "and so did the embedded PostgreSQL",  # 11. everything stopped
        # 12. eight terminals on serve + a worker, config 1 brought by the reconciler
        "tillflow cloud serve and tillflow cloud worker",
        "is woken through the serverless broker",
        "All 8 terminals now run config version 1.",
        # 13. the config that jams the XR-7: past the threshold, restored, withdrawn
        "printer_jam: XR-7 printer jams on every receipt since config version 2",
        "Threshold crossed: ",
        "sampled terminals failed",
        "The wave's check step (Check_Wave) failed for good, and that started the saga",
        "were each sent version 3, a new version with version 1's content",
        "restored, 0 failed, 0 timed out.",
        "version 2 was withdrawn: it keeps its number, but assigning it again is refused "
        "(409 stale_version",
        "8 of 8 run a floor limit of 25.00 EUR again",
        "the XR-7 printers jammed now: 0; errors: none.",
        # 14. the good config: every terminal on it, healthy; everything stopped
        "It succeeded in",
        "8 of 8 terminals healthy on version 4. Asked the terminals themselves: 8 of 8 run it",
        "the worker and the server exited, and the embedded PostgreSQL stopped",
        "Everything behaved as described.",
    ):
        assert phrase in flat, f"missing {phrase!r} in:\n{out}"
    assert "✗" not in out
    assert out.count("✓") == 21
    removed = re.search(r"Removed (\S+)(?: and (\S+))?; to keep it .* make demo KEEP=1", flat)
    assert removed, out
    for d in filter(None, removed.groups()):
        assert "tf-demo-" in d and not Path(d).exists()
    assert list(tmp_path.iterdir()) == []
