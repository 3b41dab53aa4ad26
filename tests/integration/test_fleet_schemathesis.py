"""schemathesis against the Fleet API's ``/openapi.json``, with a valid admin token: no
input, valid or not, is a server error.

The app is the real one: ``tillflow cloud serve --port 0`` on a PostgreSQL database of
this test's own (the integration ``cloud`` fixture), the token made as an operator makes
the first one (``tillflow cloud api-token create --role admin``). Every operation in the
schema is driven by hypothesis through schemathesis's strategies, in both modes: cases
the schema allows (they reach the handlers and the database) and cases it forbids (the
validation and error paths). Each answer goes through schemathesis's
``not_a_server_error`` check; every 5xx is collected (with the request as a curl command
and the server log's tail) and the test fails naming them all.

Repeatable: ``derandomize=True`` (the examples are a function of the test), no example
database, no shrinking (a failure is reported as found, not minimised, so the budget
holds). Budget: ``MAX_EXAMPLES`` per operation and mode, well under 90 s in all.
``pytest -s`` prints one line of JSON: operations, cases, server errors, seconds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hwsim.syncrig import Cloud
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from sync_memory import Terminal

from edge.engine.clock import SystemClock

#: About a minute: not in the fast tier (make test runs it).
pytestmark = pytest.mark.slow

#: Examples per operation and mode: about 40 operations x 2 modes x this many requests,
#: a few milliseconds each on a local PostgreSQL (about a minute in all).
MAX_EXAMPLES = 30
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
#: Requests are local; anything slower than this is a hang, reported as one.
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Tally:
    operations: int = 0
    cases: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)

    def count(self, status: int) -> None:
        self.cases += 1
        key = f"{status // 100}xx"
        self.statuses[key] = self.statuses.get(key, 0) + 1


def admin_token(cloud: Cloud) -> str:
    made = json.loads(
        cloud.cli("api-token", "create", "--name", "schemathesis", "--role", "admin", "--json")
    )
    return str(made["token"])


def seed(cloud: Cloud, token: str) -> dict[str, str]:
    """Things the fuzzing can aim at: an enrolled device that has synced audit rows, a
    command sent to it, and a rollout to it (random ids find nothing, so without these
    the handlers' paths past "not found" would go unasked)."""
    term = Terminal(SystemClock())
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=cloud.url, headers=headers, timeout=30) as client:
        made = client.post("/api/v1/enroll-tokens", json={"store": "s-1", "group": "g"})
        assert made.status_code == 201, made.text
        answer = client.post("/v1/enroll", **term.enroll_request(made.json()["token"]))
        assert answer.status_code == 200, answer.text
        term.device_id = answer.json()["device_id"]
        _, path, signed, body = term.signed(term.request((), term.grow_audit(3)))
        assert client.post(path, content=body, headers=signed).status_code == 200
        target = {"target": {"device_id": term.device_id}, "action": "request_health"}
        sent = client.post("/api/v1/commands", json=target)
        assert sent.status_code == 201, sent.text
        # a rollout to it (its run started; no worker runs here, so it stays pending)
        rollout = {"content": {"risk": {"floor_limit_minor": 1000}},
                   "target": {"device_ids": [term.device_id]}}  # fmt: skip
        rolled = client.post("/api/v1/config/rollout", json=rollout)
        assert rolled.status_code == 201, rolled.text
    return {
        "device_id": term.device_id,
        "command_id": sent.json()["commands"][0]["command_id"],
        "batch_id": sent.json()["batch_id"],
        "rollout_id": rolled.json()["rollout_id"],
    }


def fuzz(
    operation: Any,
    mode: schemathesis.GenerationMode,
    token: str,
    tally: Tally,
    path_parameters: dict[str, str] | None = None,
) -> None:
    """Run ``MAX_EXAMPLES`` cases of ``operation`` in ``mode`` (``path_parameters``:
    these fixed, the rest generated); 5xx go into ``tally``."""
    auth = f"Bearer {token}"
    label = f"{operation.label} ({mode.value}{', real ids' if path_parameters else ''})"

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case: Any) -> None:
        # The valid token, always (a generated Authorization header would test 401s,
        # which test_fleet_rbac does route by route).
        case.headers = {**(case.headers or {}), "Authorization": auth}
        response = case.call(timeout=REQUEST_TIMEOUT_S)
        tally.count(response.status_code)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup:
            tally.server_errors.append(
                f"{label} -> {response.status_code}: "
                f"{response.text[:300]}\n    {case.as_curl_command()}"
            )

    try:
        run()
    except Unsatisfiable:
        # an operation with nothing to get wrong (no parameters, no body) has no
        # negative cases
        if mode is not schemathesis.GenerationMode.NEGATIVE:
            raise
        tally.no_negative.append(operation.label)


@pytest.fixture
def home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A HOME of the test's own, set before the server starts: the serverless broker
    its rollouts' runs are published to is made under it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_fleet_api__no_server_error_for_any_input(home: Any, cloud: Cloud) -> None:
    token = admin_token(cloud)
    schema = schemathesis.openapi.from_url(f"{cloud.url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    # the schema is the Fleet API's own, every route in it
    labels = {op.label for op in operations}
    assert {"GET /api/v1/devices", "POST /api/v1/api-tokens", "GET /v1/health"} <= labels
    tally = Tally(operations=len(operations))
    started = time.monotonic()
    for operation in operations:
        for mode in MODES:
            fuzz(operation, mode, token, tally)
    # the operations on a device, a command or a batch, again, on the real ones
    known = seed(cloud, token)
    for operation in operations:
        names = re.findall(r"{(\w+)}", operation.path)
        fixed = {name: known[name] for name in names if name in known}
        if fixed:
            fuzz(operation, schemathesis.GenerationMode.POSITIVE, token, tally, fixed)
    seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "operations": tally.operations,
                "cases": tally.cases,
                "server_errors": len(tally.server_errors),
                "statuses": tally.statuses,
                "without_negative_cases": len(tally.no_negative),
                "seconds": round(seconds, 1),
            }
        )
    )
    # the valid token reached the handlers: some answers were not refusals
    assert tally.statuses.get("2xx", 0) > 0
    if tally.server_errors:
        pytest.fail(
            f"{len(tally.server_errors)} server errors:\n"
            + "\n".join(tally.server_errors[:20])
            + f"\n--- the server's log:\n{cloud.log_tail(80)}"
        )
