"""``tillflow cloud ...``: the control plane's commands, mounted into ``tillflow`` by the
``tillflow.commands`` entry point (``register``), so the terminal's CLI never imports
the cloud.

Commands: ``serve``, ``enroll-token create``, ``device list|revoke``, ``command send``,
``audit verify``. Every one takes ``--database-url`` (default ``$TILLFLOW_DATABASE_URL``, else
the embedded PostgreSQL of the settings' data dir).
Exit status as ``tillflow``'s: 0 ok, 1 an error, 2 bad usage, 4 ``audit verify`` found a
broken chain.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.errors import ConfigError

if TYPE_CHECKING:
    from sync.server import NewDocument, SyncService

EXIT_OK, EXIT_PROBLEMS = 0, 4
DATABASE_URL_ENV = "TILLFLOW_DATABASE_URL"  # as edge.store's (not imported: keep this light)
ACTIONS = ("request_health", "update_config", "activate_policy")


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> Callable[[argparse.Namespace], int]:
    """Add ``cloud`` and its subcommands to ``tillflow``'s parser; the handler runs the
    chosen one. Nothing heavy is imported until a command runs."""
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument(
        "--database-url",
        metavar="URL",
        help=(
            f"the control plane's PostgreSQL database (default: ${DATABASE_URL_ENV}, "
            "else the embedded one)"
        ),
    )
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument(
        "--signing-key",
        metavar="FILE",
        help="the control plane's command-signing key (default: $TILLFLOW_SIGNING_KEY_FILE, "
        "else ~/.tillflow/control-plane.key)",
    )
    p = sub.add_parser(
        "cloud",
        parents=[common],
        help="the control plane: sync service, enrollment, devices, commands",
        description="The control plane's sync service and its operator commands (needs the "
        "cloud extra and a PostgreSQL database).",
    )
    cloud = p.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")

    s = cloud.add_parser(
        "serve",
        parents=[common, db, key],
        help="run the control plane's HTTP API (sync service + Fleet API) until SIGTERM",
        description="Migrate the database, then serve the sync routes (POST /v1/enroll, "
        "/v1/sync, /v1/rotate-key, GET /v1/health) and the Fleet API (/api/v1, OpenAPI at "
        "/openapi.json, /metrics) under uvicorn. Prints 'listening on http://HOST:PORT' "
        "once the socket is bound (--port 0 picks a free port). The signing key file is "
        "created (mode 0600) if missing. Options come from the settings file, then "
        "TILLFLOW_* variables, then the flags given.",
    )
    s.add_argument(
        "--config",
        metavar="FILE",
        help="the settings file (YAML; default: $TILLFLOW_CLOUD_CONFIG)",
    )
    s.add_argument("--host", help="address to listen on (127.0.0.1)")
    s.add_argument("--port", type=int, help="port (8080; 0: any free port)")
    s.add_argument("--workers", type=int, help="API server processes (1)")
    s.add_argument("--access-log", action="store_true", help="log every request")

    s = cloud.add_parser("enroll-token", parents=[common], help="one-time enrollment tokens")
    tok = s.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    t = tok.add_parser(
        "create",
        parents=[common, db],
        help="make a token one terminal enrolls with (printed once, stored hashed)",
        description="Make a single-use enrollment token for a store (and group); a "
        "terminal enrolls with `tillflow-edge enroll --url URL --token TOKEN`.",
    )
    t.add_argument("--store", required=True, help="the store the terminal belongs to")
    t.add_argument("--group", help="its group (rollouts address groups)")
    t.add_argument("--ttl-minutes", type=float, default=10.0, help="minutes until it expires (10)")

    s = cloud.add_parser("device", parents=[common], help="enrolled devices")
    dev = s.add_subparsers(dest="device_command", required=True, metavar="SUBCOMMAND")
    dev.add_parser(
        "list",
        parents=[common, db],
        help="every device: store, group, status, last seen, health",
    )
    r = dev.add_parser(
        "revoke",
        parents=[common, db],
        help="revoke a device: its next request is refused (403)",
    )
    r.add_argument("device", metavar="DEVICE", help="the device's id")

    s = cloud.add_parser("command", parents=[common], help="signed commands to devices")
    cmd = s.add_subparsers(dest="command_command", required=True, metavar="SUBCOMMAND")
    c = cmd.add_parser(
        "send",
        parents=[common, db, key],
        help="queue a signed command; it goes down with the device's next sync",
        description="Seal a command with the control plane's key under the device's next "
        "command seq. update_config and activate_policy take a --document: YAML or JSON, "
        "either the content itself or {kind, version, content}; the version defaults to "
        "the content's own `version` (a policy states one), else the next of its kind (a "
        "rollback is a new version with the old content).",
    )
    c.add_argument("--device", required=True, metavar="DEVICE", help="the device's id")
    c.add_argument("--action", required=True, choices=ACTIONS, help="what the device is to do")
    c.add_argument("--document", metavar="FILE", help="the config or policy (.yaml/.json)")
    c.add_argument(
        "--version",
        type=int,
        help="the document version (default: the content's own, else the next of its kind)",
    )
    c.add_argument(
        "--ttl-seconds", type=float, default=3600.0, help="seconds until it expires (3600)"
    )

    s = cloud.add_parser("audit", parents=[common], help="devices' audit chains")
    aud = s.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    a = aud.add_parser(
        "verify",
        parents=[common, db],
        help="re-check a device's audit chains as the cloud holds them (exit 4: broken)",
    )
    a.add_argument("--device", required=True, metavar="DEVICE", help="the device's id")
    for name in PLUGINS:
        module = importlib.import_module(name)
        _HANDLERS.update(module.add_parsers(cloud, common=common, db=db, key=key))
    return run


#: Modules that add ``tillflow cloud`` subcommands of their own, each with
#: ``add_parsers(cloud_subparsers, *, common, db, key) -> {command: handler}``; they are
#: imported to build the parser, so they import only argparse at module level.
PLUGINS: tuple[str, ...] = ("cloud.fleet_cli", "cloud.worker_cli", "cloud.reconcile_cli")
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def run(args: argparse.Namespace) -> int:
    if args.cloud_command in _HANDLERS:
        return _HANDLERS[args.cloud_command](args)
    if args.cloud_command == "serve":
        return _serve(args)
    service = _service(args, signing=args.cloud_command == "command")
    if args.cloud_command == "enroll-token":
        return _enroll_token(args, service)
    if args.cloud_command == "device":
        return _device(args, service)
    if args.cloud_command == "command":
        return _command(args, service)
    return _audit(args, service)


# --- plumbing --------------------------------------------------------------------------------


def database_url(args: argparse.Namespace) -> str:
    """``--database-url``, else the settings' (``TILLFLOW_DATABASE_URL``, the settings
    file), else the embedded PostgreSQL: the one ``serve`` runs on embedded defaults,
    reused while it runs (started for this command, and stopped after it, when not)."""
    if args.database_url:
        return str(args.database_url)
    from cloud import embedded
    from cloud.settings import load_settings

    return embedded.database_url(load_settings(None, os.environ))


def _service(args: argparse.Namespace, *, signing: bool) -> SyncService:
    from cloud.sync.keys import key_path, load_key
    from cloud.sync.postgres import PostgresSyncBackend
    from edge.engine.clock import SystemClock
    from sync.server import SyncService

    key = load_key(key_path(args.signing_key)) if signing else None
    backend = PostgresSyncBackend(database_url(args), pool_size=2)
    args.opened.append(backend)
    return SyncService(backend, SystemClock(), key)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- commands --------------------------------------------------------------------------------


#: serve's flags that are settings (a flag given wins): flag dest -> settings field.
SERVE_FLAGS = {
    "database_url": "database_url",
    "host": "host",
    "port": "port",
    "workers": "api_workers",
    "signing_key": "signing_key_file",
}


def _serve(args: argparse.Namespace) -> int:
    from cloud.api.serve import serve_settings
    from cloud.settings import load_settings

    flags = {field: getattr(args, dest, None) for dest, field in SERVE_FLAGS.items()}
    settings = load_settings(args.config, **flags)
    return serve_settings(settings, config=args.config, access_log=args.access_log)


def _enroll_token(args: argparse.Namespace, service: SyncService) -> int:
    token = service.create_enroll_token(args.store, args.group, ttl_s=args.ttl_minutes * 60)
    data = {
        "token": token.token,
        "store": token.store,
        "group": token.group,
        "expires_at": token.expires_at,
    }
    _emit(args, data, token.token)
    if not args.json:
        where = f"store {token.store}" + (f", group {token.group}" if token.group else "")
        print(f"single use, for {where}; expires {_when(token.expires_at)}", file=sys.stderr)
    return EXIT_OK


def _device(args: argparse.Namespace, service: SyncService) -> int:
    if args.device_command == "revoke":
        device = service.revoke_device(args.device)
        _emit(
            args,
            {
                "device_id": device.device_id,
                "status": device.status,
                "revoked_at": device.revoked_at,
            },
            f"device {device.device_id} revoked",
        )
        return EXIT_OK
    devices = service.list_devices()
    rows: list[dict[str, Any]] = []
    for d in devices:
        hb = dict(d.heartbeat or {})
        rows.append(
            {
                "device_id": d.device_id,
                "store": d.store,
                "group": d.group,
                "status": d.status,
                "enrolled_at": d.enrolled_at,
                "last_seen_at": d.last_seen_at,
                "binary_version": hb.get("binary_version", d.binary_version),
                "storage_state": hb.get("storage_state"),
                "outbox_depth": hb.get("outbox_depth"),
                "conflicts": d.conflicts,
                "heartbeat": hb or None,
            }
        )
    lines = [
        f"{'device':<22} {'store':<16} {'group':<12} {'status':<8} {'last seen':<20} "
        f"{'binary':<10} {'storage':<10} {'outbox':>6} {'conflicts':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['device_id']:<22} {r['store']:<16} {r['group'] or '-':<12} {r['status']:<8} "
            f"{_when(r['last_seen_at']):<20} {r['binary_version'] or '-':<10} "
            f"{r['storage_state'] or '-':<10} {_dash(r['outbox_depth']):>6} {r['conflicts']:>9}"
        )
    _emit(args, rows, "\n".join(lines) if rows else "no devices")
    return EXIT_OK


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _command(args: argparse.Namespace, service: SyncService) -> int:
    document = None
    if args.document:
        document = _document(Path(args.document), args.version)
    elif args.version is not None:
        raise ConfigError("--version needs a --document")
    queued = service.queue_command(args.device, args.action, document, ttl_s=args.ttl_seconds)
    data = {
        "command_id": queued.command_id,
        "device_id": queued.device_id,
        "seq": queued.seq,
        "action": queued.action,
        "expires_at": queued.expires_at,
        "document": None
        if queued.document_kind is None
        else {"kind": queued.document_kind, "version": queued.document_version},
    }
    text = f"queued {queued.action} for {queued.device_id} as command seq {queued.seq}"
    if queued.document_kind:
        text += f" ({queued.document_kind} version {queued.document_version})"
    _emit(args, data, text + f"; expires {_when(queued.expires_at)}")
    return EXIT_OK


def _document(path: Path, version: int | None) -> NewDocument:
    import yaml

    from sync.server import NewDocument

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the document {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, not {type(data).__name__}")
    if set(data) <= {"kind", "version", "content"} and isinstance(data.get("content"), dict):
        kind, given, content = data.get("kind"), data.get("version"), data["content"]
        if kind not in (None, "config", "policy"):
            raise ConfigError(f"{path}: kind must be config or policy, not {kind!r}")
        if given is not None and (type(given) is not int or given < 1):
            raise ConfigError(f"{path}: version must be a whole number >= 1")
        if version is not None and given is not None and version != given:
            raise ConfigError(f"{path} says version {given}, --version says {version}")
        return NewDocument(content, kind, version if version is not None else given)
    return NewDocument(data, None, version)


def _audit(args: argparse.Namespace, service: SyncService) -> int:
    report = service.verify_device_audit(args.device)
    chains = [
        {
            "stream": c.stream,
            "chain": c.chain,
            "ok": c.ok,
            "rows": c.rows,
            "head_seq": c.head_seq,
            "first_bad_seq": c.first_bad_seq,
            "reason": c.reason,
            "recorded_at_ingest": c.recorded,
        }
        for c in report.chains
    ]
    lines = []
    for c in report.chains:
        where = f"stream {c.stream} chain {c.chain}"
        if c.ok:
            lines.append(f"ok      {where}: {c.rows} rows verified, head {c.head_seq}")
        else:
            how = "recorded at ingest" if c.recorded else "in the rows held"
            lines.append(
                f"BROKEN  {where} at seq {c.first_bad_seq} ({how}): {c.reason}; "
                f"{c.rows} rows held, head {c.head_seq}"
            )
    if not lines:
        lines.append(f"device {args.device}: no audit rows held yet")
    _emit(args, {"device_id": args.device, "ok": report.ok, "chains": chains}, "\n".join(lines))
    return EXIT_OK if report.ok else EXIT_PROBLEMS
