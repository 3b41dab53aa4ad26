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
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hwsim.syncrig import Cloud
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup

#: Examples per operation and mode. About 25 operations x 2 modes x this many requests,
#: each a few milliseconds on a local PostgreSQL.
MAX_EXAMPLES = 40
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


def fuzz(operation: Any, mode: schemathesis.GenerationMode, token: str, tally: Tally) -> None:
    """Run ``MAX_EXAMPLES`` cases of ``operation`` in ``mode``; 5xx go into ``tally``."""
    auth = f"Bearer {token}"

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
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
                f"{operation.label} ({mode.value}) -> {response.status_code}: "
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


def test_fleet_api__no_server_error_for_any_input(cloud: Cloud) -> None:
    token = admin_token(cloud)
    schema = schemathesis.openapi.from_url(f"{cloud.url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    # the schema is the Fleet API's own: every operation under /api/v1 (and health)
    assert operations and all(op.path.startswith(("/api/v1/", "/v1/")) for op in operations)
    tally = Tally(operations=len(operations))
    started = time.monotonic()
    for operation in operations:
        for mode in MODES:
            fuzz(operation, mode, token, tally)
    seconds = time.monotonic() - started
    print(
        json.dumps(
            {
                "operations": tally.operations,
                "cases": tally.cases,
                "server_errors": len(tally.server_errors),
                "statuses": tally.statuses,
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
