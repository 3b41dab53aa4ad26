"""``tillflow fleet ...``: the operator's CLI over the Fleet API (HTTP, httpx), from any
host that reaches the API; mounted into ``tillflow`` by the ``tillflow.commands`` entry
point (``register``).

Where and who: ``--url`` (default ``$TILLFLOW_API_URL``, else http://127.0.0.1:8080) and
``--token`` (default ``$TILLFLOW_API_TOKEN``, else the file ``~/.tillflow/api-token``);
the token is sent as ``Authorization: Bearer`` and never printed or logged.

Commands::

    tokens create|list|revoke              API tokens (admin)
    enroll-tokens create|list|revoke       one-time enrollment tokens (operate)
    devices list [filters]|show|revoke|tag|untag|move
    commands send|list|show|batch          signed commands to a device, group or store
    documents create|list|show|assign|assignments|unassign|effective
                                           config and fraud-policy documents
    audit verify --device D | --cloud      re-check a chain (exit 4: broken)
    audit log --device D | --cloud         the rows, paged
    quarantine list|show|replay|discard
    outcomes list|show                     unknown outcomes (open or resolved), with their age
    rollouts start|list|show|devices|watch|pause|resume|approve|abort|retry-failed
                                           config, policy and release rollouts in waves
                                           (cloud.opcli_rollouts)

Output is an aligned table, or with ``--json`` the API's JSON (a list as ``{"items",
"next"}``: ``next`` is the cursor to go on from, null at the end). Lists follow the
API's ``next`` cursors up to ``--limit`` items. An answer that is a refusal prints the
server's ``{"error": {code, message, field}}`` on stderr.

Exit status: 0 ok, 1 an error (the server refused, could not be reached, or answered
something else), 2 bad usage, 4 a verification found a broken chain.

Only argparse (and the standard library's light modules) at import; httpx when a command
runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

URL_ENV = "TILLFLOW_API_URL"
TOKEN_ENV = "TILLFLOW_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
#: The token's file when neither --token nor the environment gives one (keep it 0600).
TOKEN_FILE = "~/.tillflow/api-token"
API = "/api/v1"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BROKEN = 0, 1, 2, 4
#: Seconds to open a connection (a server that is not there says so quickly) and to
#: wait for an answer (a chain's verification reads every row it holds).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0
#: The API's largest page; a list asks for at most this many items per request.
PAGE_MAX = 1000
DEFAULT_LIMIT = 1000

#: As the API's (cloud.fleet.tokens.ROLES; not imported: keep this light).
ROLES = ("admin", "operator", "auditor", "read_only")
HEALTH = ("ok", "high_water", "full", "unknown")
KINDS = ("config", "policy")
SCOPES = ("fleet", "group", "store", "device")
ACTIONS = ("update_config", "activate_policy", "request_health")
COMMAND_STATUSES = ("queued", "delivered", "applied", "refused", "expired")
#: ``30m``, ``2h``, ``1d``: that long ago.
_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Data = Any
#: A command: (the client, its arguments) -> (JSON data, text for a person, exit status).
Action = Callable[["Api", argparse.Namespace], tuple[Data, str, int]]


class FleetError(Exception):
    """What goes wrong for the operator: printed as ``error: ...``, exit 1."""


# --- the client ----------------------------------------------------------------------------


class Api:
    """One httpx client on ``url`` with the token; JSON in, JSON out, errors as
    ``FleetError`` carrying the server's own ``{code, message, field}``."""

    def __init__(self, url: str, token: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._httpx = httpx
        self.client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "tillflow-fleet"},
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        )

    def close(self) -> None:
        self.client.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        httpx = self._httpx
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            answer = self.client.request(
                method, API + path, params=query, json=body if body is not None else None
            )
        except httpx.ConnectError as exc:
            raise FleetError(f"cannot reach the Fleet API at {self.url}: {exc}") from None
        except httpx.TimeoutException:
            raise FleetError(f"the Fleet API at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise FleetError(f"talking to the Fleet API at {self.url}: {exc}") from None
        if answer.status_code >= 400:
            raise FleetError(refusal(answer))
        if not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            raise FleetError(
                f"{method} {path}: the server answered {answer.status_code} with no JSON "
                f"(is {self.url} the Fleet API?)"
            ) from None

    def items(
        self, path: str, params: dict[str, Any], limit: int, page_size: int = PAGE_MAX
    ) -> dict[str, Any]:
        """Up to ``limit`` items of a paged list, ``page_size`` a request, following
        ``next``; ``{"items", "next"}`` (``next``: where the rest begins, None at the end)."""
        items: list[Any] = []
        after = params.pop("after", None)
        while True:
            size = min(page_size, PAGE_MAX, limit - len(items))
            page = self.call("GET", path, params={**params, "limit": size, "after": after})
            items.extend(page["items"])
            after = page.get("next")
            if after is None or len(items) >= limit:
                return {"items": items, "next": after}


def refusal(answer: httpx.Response) -> str:
    """The server's error as one line: ``401 unauthenticated: ... (field: x)``."""
    try:
        err = answer.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        text = f"{answer.status_code} {err.get('code', '?')}: {err.get('message', '')}"
        if err.get("field"):
            text += f" (field: {err['field']})"
        return text
    snippet = answer.text.strip().replace("\n", " ")[:200]
    return f"{answer.status_code} {answer.reason_phrase}" + (f": {snippet}" if snippet else "")


# --- output ---------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


Column = tuple[str, Callable[[dict[str, Any]], Any]]


def col(header: str, key: str | None = None, *, time: bool = False) -> Column:
    name = key or header
    return header, (lambda r: when(r.get(name))) if time else (lambda r: cell(r.get(name)))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], empty: str) -> str:
    """``rows`` as aligned columns under a header (``empty`` if there are none)."""
    if not rows:
        return empty
    cells = [[h for h, _ in columns]] + [[str(f(r)) for _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def pages(api: Api, a: argparse.Namespace, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """A list command's items: from ``--after``, ``--page-size`` a request, to ``--limit``."""
    return api.items(path, {**params, "after": a.after}, a.limit, a.page_size)


def listing(data: dict[str, Any], columns: Sequence[Column], empty: str) -> tuple[Data, str, int]:
    text = table(data["items"], columns, empty)
    if data.get("next") is not None:
        text += f"\n(more: raise --limit, or go on with --after {data['next']})"
    return data, text, EXIT_OK


def record(data: dict[str, Any], fields: Sequence[str]) -> str:
    """One object as ``field: value`` lines."""
    width = max(len(f) for f in fields)
    lines = []
    for f in fields:
        v = data.get(f)
        shown = when(v) if f.endswith("_at") and isinstance(v, int | float) else cell(v)
        lines.append(f"{f + ':':<{width + 1}} {shown}")
    return "\n".join(lines)


def since(text: str) -> float:
    """A time as Unix seconds: a number, an ISO 8601 time (UTC if it names no zone),
    or ``30m``/``2h``/``1d`` (that long ago)."""
    ago = _AGO.match(text)
    if ago:
        return dt.datetime.now(tz=dt.UTC).timestamp() - float(ago[1]) * _UNIT_S[ago[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: Unix seconds, ISO 8601, or 30m/2h/1d ago"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


def load_document(path: str) -> Any:
    """A document's content from a YAML or JSON file (``-``: stdin)."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise FleetError(f"{path} is not valid YAML/JSON: {exc}") from None


# --- the commands ---------------------------------------------------------------------------

TOKEN_COLS = [
    col("id", "token_id"), col("role"), col("name"), col("created", "created_at", time=True),
    col("revoked", "revoked_at", time=True), col("last used", "last_used_at", time=True),
]  # fmt: skip
ENROLL_COLS = [
    col("id"), col("store"), col("group"), col("state"),
    col("expires", "expires_at", time=True), col("used by", "used_by"),
]  # fmt: skip
DEVICE_COLS = [
    col("device", "device_id"), col("store"), col("group"), col("status"), col("health"),
    col("last seen", "last_seen_at", time=True), col("binary", "binary_version"),
    col("config", "config_version"), col("policy", "policy_version"), col("tags"),
]  # fmt: skip
DEVICE_FIELDS = [
    "device_id", "store", "group", "status", "health", "enrolled_at", "revoked_at",
    "last_seen_at", "binary_version", "config_version", "policy_version", "tags",
    "conflicts", "open_quarantine", "rotated_at",
]  # fmt: skip
COMMAND_COLS = [
    col("id", "command_id"), col("device", "device_id"), col("seq"), col("action"),
    col("status"), col("reason"), col("expires", "expires_at", time=True),
]  # fmt: skip
QUARANTINE_COLS = [
    col("id"), col("device", "device_id"), col("kind"), col("seq"), col("status"),
    col("reason"), col("received", "received_at", time=True),
]  # fmt: skip


def tokens_create(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    made = api.call("POST", "/api-tokens", body={"name": a.name, "role": a.role})
    # the one place a token is shown: it is the command's answer, asked for
    return made, made["token"], EXIT_OK


def tokens_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    return listing(pages(api, a, "/api-tokens", {}), TOKEN_COLS, "no API tokens")


def tokens_revoke(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/api-tokens/{a.id}/revoke")
    return out, f"API token {out['token_id']} ({out['name']}) revoked", EXIT_OK


def enroll_create(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    body = {"store": a.store, "group": a.group, "ttl_minutes": a.ttl_minutes}
    made = api.call("POST", "/enroll-tokens", body=body)
    return made, made["token"], EXIT_OK


def enroll_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    data = pages(api, a, "/enroll-tokens", {"store": a.store})
    return listing(data, ENROLL_COLS, "no enrollment tokens")


def enroll_revoke(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/enroll-tokens/{a.id}/revoke")
    return out, f"enrollment token {out['id']} ({out['store']}) revoked", EXIT_OK


def devices_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    params = {
        "store": a.store, "group": a.group, "tag": a.tag, "binary_version": a.binary_version,
        "config_version": a.config_version, "policy_version": a.policy_version,
        "health": a.health, "status": a.status, "last_seen_before": a.seen_before,
        "last_seen_after": a.seen_after,
    }  # fmt: skip
    return listing(pages(api, a, "/devices", params), DEVICE_COLS, "no devices")


def _device(out: dict[str, Any]) -> tuple[Data, str, int]:
    text = record(out, DEVICE_FIELDS)
    for c in out.get("chains") or []:
        state = c["state"] if c["state"] == "ok" else f"BROKEN at {c['first_bad_seq']}"
        text += f"\nchain {c['stream']}/{c['chain']}: {c['base_seq']}..{c['head_seq']} {state}"
    return out, text, EXIT_OK


def devices_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    return _device(api.call("GET", f"/devices/{_seg(a.device)}"))


def devices_revoke(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/devices/{_seg(a.device)}/revoke")
    return out, f"device {out['device_id']} revoked: its next request is refused", EXIT_OK


def devices_tag(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/devices/{_seg(a.device)}/tags", body={"tag": a.tag})
    return out, f"device {out['device_id']} tags: {cell(out['tags'])}", EXIT_OK


def devices_untag(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("DELETE", f"/devices/{_seg(a.device)}/tags/{_seg(a.tag)}")
    return out, f"device {out['device_id']} tags: {cell(out['tags'])}", EXIT_OK


def devices_move(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    group = None if a.no_group else a.group
    out = api.call("PUT", f"/devices/{_seg(a.device)}/group", body={"group": group})
    return out, f"device {out['device_id']} is in group {cell(out['group'])}", EXIT_OK


def audit_verify(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    if a.cloud:
        out = api.call("GET", "/audit/verify")
        if out["ok"]:
            return out, f"ok      the cloud's audit log: {out['rows']} rows verified", EXIT_OK
        text = f"BROKEN  the cloud's audit log at seq {out['first_bad_seq']}: {out['reason']}"
        return out, text, EXIT_BROKEN
    out = api.call("GET", f"/devices/{_seg(a.device)}/audit/verify")
    lines = []
    for c in out["chains"]:
        where = f"stream {c['stream']} chain {c['chain']}"
        if c["ok"]:
            lines.append(f"ok      {where}: {c['rows']} rows verified, head {c['head_seq']}")
        else:
            how = "recorded at ingest" if c["recorded_at_ingest"] else "in the rows held"
            lines.append(
                f"BROKEN  {where} at seq {c['first_bad_seq']} ({how}): {c['reason']}; "
                f"{c['rows']} rows held, head {c['head_seq']}"
            )
    text = "\n".join(lines) or f"device {a.device}: no audit rows held yet"
    return out, text, EXIT_OK if out["ok"] else EXIT_BROKEN


def audit_log(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    if a.cloud:
        params = {"action": a.action, "actor": a.actor}
        cols = [
            col("seq"), col("at", time=True), col("actor"), col("role", "actor_role"),
            col("action"), col("target"),
        ]  # fmt: skip
        return listing(pages(api, a, "/audit", params), cols, "no audit rows")
    params = {"stream": a.stream, "chain": a.chain}
    cols = [
        col("stream"), col("chain"), col("seq"), col("at", time=True), col("event"),
        col("step"), col("run", "run_id"),
    ]  # fmt: skip
    data = pages(api, a, f"/devices/{_seg(a.device)}/audit", params)
    return listing(data, cols, f"device {a.device}: no audit rows held")


def quarantine_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    params = {"device_id": a.device, "status": a.status, "kind": a.kind}
    data = pages(api, a, "/quarantine", params)
    return listing(data, QUARANTINE_COLS, "the quarantine is empty")


def _item(out: dict[str, Any]) -> str:
    text = record(out, ["id", "device_id", "stream", "seq", "kind", "status", "reason",
                        "detail", "received_at"])  # fmt: skip
    for d in out.get("decisions") or []:
        text += f"\n{when(d['at'])} {d['decision']} by {d['actor']}: {cell(d['reason'])}"
    return text


def quarantine_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/quarantine/{a.id}")
    return out, _item(out), EXIT_OK


def quarantine_replay(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/quarantine/{a.id}/replay", body={"reason": a.reason})
    landed = "landed" if out["landed"] else "still quarantined"
    return out, f"item {a.id} replayed: {out['outcome']} ({landed})", EXIT_OK


def quarantine_discard(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("POST", f"/quarantine/{a.id}/discard", body={"reason": a.reason})
    return out, f"item {a.id} discarded", EXIT_OK


def commands_send(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    target = {"device_id": a.device, "group": a.group, "store": a.store}
    body: dict[str, Any] = {
        "target": {k: v for k, v in target.items() if v is not None},
        "action": a.action,
        "ttl_s": a.ttl_seconds,
    }
    if a.document is not None:
        body["document"] = {"kind": a.document[0], "version": a.document[1]}
    out = api.call("POST", "/commands", body=body)
    sent = out["commands"]
    text = f"queued {out['action']} for {len(sent)} device(s) of {out['scope']} {out['value']}"
    text += f" (batch {out['batch_id']}; expires {when(out['expires_at'])})\n"
    text += table(sent, [col("id", "command_id"), col("device", "device_id"), col("seq")], "")
    return out, text, EXIT_OK


def commands_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    params = {"device": a.device, "status": a.status, "batch": a.batch}
    return listing(pages(api, a, "/commands", params), COMMAND_COLS, "no commands")


def commands_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/commands/{_seg(a.id)}")
    doc = out.get("document")
    shown = {**out, "document": None if doc is None else f"{doc['kind']} {doc['version']}"}
    fields = ["command_id", "device_id", "seq", "action", "document", "batch_id", "status",
              "reason", "created_at", "delivered_at", "result_at", "expires_at"]  # fmt: skip
    return out, record(shown, fields), EXIT_OK


def commands_batch(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/command-batches/{_seg(a.id)}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(out["by_status"].items()) if n)
    text = f"batch {out['batch_id']}: {out['action']} to {out['total']} device(s): {counts or '-'}"
    return out, text, EXIT_OK


def documents_create(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    content = load_document(a.file)
    if not isinstance(content, dict):
        raise FleetError(f"{a.file} must hold a mapping, not {type(content).__name__}")
    out = api.call("POST", f"/documents/{a.kind}", body={"content": content, "version": a.version})
    return out, f"{out['kind']} version {out['version']} stored", EXIT_OK


def documents_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    cols = [col("kind"), col("version"), col("created", "created_at", time=True)]
    return listing(pages(api, a, f"/documents/{a.kind}", {}), cols, f"no {a.kind} documents")


def documents_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/documents/{a.kind}/{a.version}")
    return out, json.dumps(out["content"], indent=2), EXIT_OK


def documents_assign(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    if (a.scope == "fleet") != (a.value is None):
        raise FleetError("--value names the group, store or device (and the fleet takes none)")
    body = {"version": a.version, "scope": a.scope, "value": a.value}
    out = api.call("POST", f"/documents/{a.kind}/assignments", body=body)
    where = out["scope"] + (f" {out['value']}" if out["value"] else "")
    was = out.get("previous_version")
    text = f"{out['kind']} version {out['version']} assigned to {where}"
    text += f" (was {was})" if was is not None else ""
    return out, text, EXIT_OK


ASSIGNMENT_COLS = [
    col("id", "assignment_id"), col("scope"), col("value"), col("version"),
    col("assigned", "assigned_at", time=True), col("by", "assigned_by"),
]  # fmt: skip


def documents_assignments(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    params = {"scope": a.scope, "value": a.value, "version": a.version}
    data = pages(api, a, f"/documents/{a.kind}/assignments", params)
    return listing(data, ASSIGNMENT_COLS, f"no {a.kind} assignments")


def documents_unassign(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("DELETE", f"/documents/{a.kind}/assignments/{a.id}")
    where = out["scope"] + (f" {out['value']}" if out["value"] else "")
    return out, f"{out['kind']} assignment {a.id} ({where}) removed", EXIT_OK


def documents_effective(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/devices/{_seg(a.device)}/effective/{a.kind}")
    if out["version"] is None:
        text = f"device {out['device_id']}: no {out['kind']} assigned"
    else:
        where = out["scope"] + (f" {out['value']}" if out["value"] else "")
        text = f"device {out['device_id']}: {out['kind']} version {out['version']} (from {where})"
    in_force = out.get("in_force_version")
    text += f"; in force: {cell(in_force)}" + ("" if out["in_sync"] else " (not in sync)")
    return out, text, EXIT_OK


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


OUTCOME_COLS = [
    col("id", "outcome_id"), col("device", "device_id"), col("operation"),
    col("amount", "amount_minor"), col("currency"), col("state"),
    ("age", lambda r: _age(r.get("age_s"))), col("status"), col("command", "command_status"),
]  # fmt: skip


def outcomes_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    params = {"state": a.state, "device_id": a.device}
    return listing(pages(api, a, "/outcomes", params), OUTCOME_COLS, "no unknown outcomes")


def outcomes_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/outcomes/{_seg(a.id)}")
    fields = ["outcome_id", "device_id", "operation", "key", "run_id", "amount_minor", "currency",
              "state", "age", "reported_at", "found_at", "status", "acquirer_ref", "resolved_at",
              "command_id", "command_status", "command_reason", "command_note"]  # fmt: skip
    return out, record({**out, "age": _age(out["age_s"])}, fields), EXIT_OK


def _seg(text: str) -> str:
    """``text`` as one path segment (a ``/`` or ``?`` in an id stays in it)."""
    from urllib.parse import quote

    return quote(text, safe="")


# --- the parser ------------------------------------------------------------------------------


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> Callable[[argparse.Namespace], int]:
    """Add ``fleet`` and its commands to ``tillflow``'s parser; the handler runs the one
    chosen."""
    # --url/--token wherever they are given (before or after the command): a default
    # that is SUPPRESS does not overwrite the value an outer parser took
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--url", default=argparse.SUPPRESS,
        help=f"the Fleet API (default: ${URL_ENV}, else {DEFAULT_URL})",
    )  # fmt: skip
    where.add_argument(
        "--token", default=argparse.SUPPRESS, metavar="TOKEN",
        help=f"an API token (default: ${TOKEN_ENV}, else the file {TOKEN_FILE})",
    )  # fmt: skip
    parents = [common, where]
    p = sub.add_parser(
        "fleet",
        parents=parents,
        help="operate the fleet through the Fleet API: tokens, devices, commands, audit",
        description="The operator's commands over the Fleet API (HTTP). Exit status: 0 ok, "
        "1 an error, 2 bad usage, 4 a verification found a broken chain.",
    )
    groups = p.add_subparsers(dest="fleet_group", required=True, metavar="COMMAND")

    def group(name: str, help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        g = groups.add_parser(name, parents=parents, help=help)
        return g.add_subparsers(dest="fleet_command", required=True, metavar="SUBCOMMAND")

    def leaf(
        g: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        action: Action,
        help: str,
        *,
        paged: bool = False,
    ) -> argparse.ArgumentParser:
        c = g.add_parser(name, parents=parents, help=help, description=help)
        c.set_defaults(fleet_action=action)
        if paged:
            c.add_argument(
                "--limit", type=_positive, default=DEFAULT_LIMIT,
                help=f"at most this many items (following the pages; {DEFAULT_LIMIT})",
            )  # fmt: skip
            c.add_argument("--after", metavar="CURSOR", help="start after this cursor (a `next`)")
            c.add_argument(
                "--page-size", type=_positive, default=PAGE_MAX, metavar="N",
                help=f"items asked for in one request (at most {PAGE_MAX})",
            )  # fmt: skip
        return c

    g = group("tokens", "API tokens (admin)")
    c = leaf(g, "create", tokens_create, "make an API token (printed once; stored hashed)")
    c.add_argument("--name", required=True, help="who or what holds it (shown in the audit log)")
    c.add_argument("--role", required=True, choices=ROLES, help="what it may do")
    leaf(g, "list", tokens_list, "every API token: id, role, name, use", paged=True)
    c = leaf(g, "revoke", tokens_revoke, "revoke an API token (its next use is 401)")
    c.add_argument("id", metavar="ID", help="the token's id (tok_...)")

    g = group("enroll-tokens", "one-time enrollment tokens (operate)")
    c = leaf(g, "create", enroll_create, "make a token one terminal enrolls with (printed once)")
    c.add_argument("--store", required=True, help="the store the terminal belongs to")
    c.add_argument("--group", help="its group")
    c.add_argument("--ttl-minutes", type=float, default=10.0, help="minutes it lives (10)")
    c = leaf(g, "list", enroll_list, "enrollment tokens: id, store, state, used by", paged=True)
    c.add_argument("--store", help="only this store's")
    c = leaf(g, "revoke", enroll_revoke, "revoke an unused enrollment token")
    c.add_argument("id", metavar="ID", help="the token's id (12 hex digits)")

    g = group("devices", "enrolled devices")
    c = leaf(g, "list", devices_list, "devices; every filter given must match", paged=True)
    c.add_argument("--store")
    c.add_argument("--group")
    c.add_argument("--tag")
    c.add_argument("--binary-version", metavar="VERSION")
    c.add_argument("--config-version", type=int, metavar="N")
    c.add_argument("--policy-version", type=int, metavar="N")
    c.add_argument("--health", choices=HEALTH)
    c.add_argument("--status", choices=("active", "revoked"))
    c.add_argument(
        "--seen-before", type=since, metavar="WHEN",
        help="last seen before WHEN: Unix seconds, ISO 8601, or 30m/2h/1d (ago)",
    )  # fmt: skip
    c.add_argument("--seen-after", type=since, metavar="WHEN", help="last seen at or after WHEN")
    for name, action, what in (
        ("show", devices_show, "one device: heartbeat, tags, chains, open quarantine"),
        ("revoke", devices_revoke, "the kill switch: the device's next request is refused"),
    ):
        leaf(g, name, action, what).add_argument("device", metavar="DEVICE")
    for name, action, what in (
        ("tag", devices_tag, "add a tag to a device"),
        ("untag", devices_untag, "remove a tag from a device"),
    ):
        c = leaf(g, name, action, what)
        c.add_argument("device", metavar="DEVICE")
        c.add_argument("tag", metavar="TAG")
    c = leaf(g, "move", devices_move, "put a device in a group (or in none)")
    c.add_argument("device", metavar="DEVICE")
    to = c.add_mutually_exclusive_group(required=True)
    to.add_argument("--group")
    to.add_argument("--no-group", action="store_true", help="in no group")

    g = group("commands", "signed commands to devices")
    c = leaf(
        g,
        "send",
        commands_send,
        "queue a command for a device, or every device of a group or store",
    )
    to = c.add_mutually_exclusive_group(required=True)
    to.add_argument("--device", metavar="DEVICE")
    to.add_argument("--group")
    to.add_argument("--store")
    c.add_argument("--action", required=True, choices=ACTIONS)
    c.add_argument(
        "--document", type=_document_ref, metavar="KIND:VERSION",
        help="the stored document it carries (config:3, policy:2)",
    )  # fmt: skip
    c.add_argument("--ttl-seconds", type=float, default=3600.0, help="seconds it lives (3600)")
    c = leaf(g, "list", commands_list, "commands, newest first, with their status", paged=True)
    c.add_argument("--device", metavar="DEVICE")
    c.add_argument("--status", choices=COMMAND_STATUSES)
    c.add_argument("--batch", metavar="BATCH", help="one send's commands")
    leaf(g, "show", commands_show, "one command and its status").add_argument("id", metavar="ID")
    leaf(g, "batch", commands_batch, "one send's commands counted by status").add_argument(
        "id", metavar="BATCH"
    )

    g = group("documents", "config and fraud-policy documents")
    c = leaf(
        g, "create", documents_create, "store a new version (validated by the terminal's model)"
    )
    c.add_argument("kind", choices=KINDS)
    c.add_argument("file", metavar="FILE", help="its content, YAML or JSON (-: stdin)")
    c.add_argument("--version", type=_positive, help="the version (default: the next)")
    c = leaf(g, "list", documents_list, "versions, newest first", paged=True)
    c.add_argument("kind", choices=KINDS)
    c = leaf(g, "show", documents_show, "one version's content")
    c.add_argument("kind", choices=KINDS)
    c.add_argument("version", type=_positive)
    c = leaf(
        g, "assign", documents_assign, "assign a version to the fleet, a group, store or device"
    )
    c.add_argument("kind", choices=KINDS)
    c.add_argument("--version", type=_positive, required=True)
    c.add_argument("--scope", choices=SCOPES, required=True)
    c.add_argument("--value", help="the group, store or device id (not for the fleet)")
    c = leaf(g, "assignments", documents_assignments, "the assignments of a kind", paged=True)
    c.add_argument("kind", choices=KINDS)
    c.add_argument("--scope", choices=SCOPES)
    c.add_argument("--value")
    c.add_argument("--version", type=_positive)
    c = leaf(g, "unassign", documents_unassign, "remove an assignment (its devices fall back)")
    c.add_argument("kind", choices=KINDS)
    c.add_argument("id", type=_positive, metavar="ID")
    c = leaf(g, "effective", documents_effective, "the version a device should run, and from where")
    c.add_argument("kind", choices=KINDS)
    c.add_argument("--device", required=True, metavar="DEVICE")

    g = group("audit", "audit chains: devices' and the cloud's own")
    c = leaf(g, "verify", audit_verify, "re-check a chain from its base (exit 4: broken)")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--device", metavar="DEVICE", help="the device's chains as the cloud holds them"
    )
    which.add_argument("--cloud", action="store_true", help="the cloud's log of operator actions")
    c = leaf(g, "log", audit_log, "audit rows, oldest first", paged=True)
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", metavar="DEVICE", help="a device's rows")
    which.add_argument("--cloud", action="store_true", help="the cloud's log of operator actions")
    c.add_argument("--stream", help="(--device) one stream's rows")
    c.add_argument("--chain", type=int, help="(--device) one chain's rows")
    c.add_argument("--action", help="(--cloud) one action's rows (device.revoke, ...)")
    c.add_argument("--actor", help="(--cloud) one actor's rows (a token's name)")

    g = group("quarantine", "entries the cloud set aside")
    c = leaf(g, "list", quarantine_list, "quarantined items", paged=True)
    c.add_argument("--device", metavar="DEVICE")
    c.add_argument("--status", choices=("open", "replayed", "discarded"))
    c.add_argument("--kind", choices=("outbox", "audit"))
    leaf(g, "show", quarantine_show, "one item: the entry and what was done with it").add_argument(
        "id", type=int, metavar="ID"
    )
    c = leaf(g, "replay", quarantine_replay, "run an item through the sync ingest again")
    c.add_argument("id", type=int, metavar="ID")
    c.add_argument("--reason", help="why (kept with the decision)")
    c = leaf(g, "discard", quarantine_discard, "set an item aside for good")
    c.add_argument("id", type=int, metavar="ID")
    c.add_argument("--reason", required=True, help="why (kept with the decision)")

    g = group("outcomes", "authorisations and refunds whose answer was lost")
    c = leaf(g, "list", outcomes_list, "unknown outcomes, with their age and state", paged=True)
    c.add_argument("--state", choices=("open", "resolved"), help="open: still unknown")
    c.add_argument("--device", metavar="DEVICE")
    leaf(
        g, "show", outcomes_show, "one outcome: the acquirer's truth and the command"
    ).add_argument("id", metavar="ID")

    # rollouts: config, policy and release changes in waves (cloud.opcli_rollouts)
    from cloud import opcli_rollouts

    opcli_rollouts.add_commands(sys.modules[__name__], group, leaf)
    from cloud import opcli_releases  # releases upload|list|show (cloud.opcli_releases)

    opcli_releases.add_commands(sys.modules[__name__], group, leaf)
    return run


def _document_ref(text: str) -> tuple[str, int]:
    kind, _, version = text.partition(":")
    if kind not in KINDS or not version.isdigit() or int(version) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: KIND:VERSION, e.g. config:3 or policy:2")
    return kind, int(version)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return n


# --- running ---------------------------------------------------------------------------------


def api_url(args: argparse.Namespace) -> str:
    url = getattr(args, "url", None) or os.environ.get(URL_ENV) or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise FleetError(f"--url {url!r}: an http:// or https:// URL, please")
    return str(url)


def api_token(args: argparse.Namespace) -> str:
    """The token: --token, $TILLFLOW_API_TOKEN, else the token file's first line."""
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV)
    if not token:
        path = Path(TOKEN_FILE).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            token = None
        except OSError as exc:
            raise FleetError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise FleetError(
            f"no API token: pass --token, set {TOKEN_ENV}, or put it in {TOKEN_FILE} "
            "(`tillflow cloud api-token create` makes the first)"
        )
    return str(token).strip()


def run(args: argparse.Namespace) -> int:
    """Run the chosen command: its answer on stdout, an error on stderr."""
    action: Action = args.fleet_action
    try:
        api = Api(api_url(args), api_token(args))
        try:
            data, text, code = action(api, args)
        finally:
            api.close()
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2) if args.json else text)
    return code


__all__ = [
    "DEFAULT_URL",
    "TOKEN_ENV",
    "TOKEN_FILE",
    "URL_ENV",
    "Api",
    "FleetError",
    "register",
    "run",
]
