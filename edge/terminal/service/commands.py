"""The terminal's commands: ``tillflow edge SUBCOMMAND`` and ``tillflow-edge SUBCOMMAND``.

One set of subcommands, mounted by both ``edge.cli`` (under ``edge``) and
``edge.terminal.service.main`` (the frozen binary's top level), so a command behaves alike from
source and frozen. Imports stay inside the commands, so the daemon does not load what
only the other commands use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_PROBLEMS = 0, 1, 4
#: How long ``health`` waits for the daemon's answer (s).
HEALTH_TIMEOUT_S = 5.0

DESCRIPTION = (
    "The payment terminal: the daemon beside the POS app and its maintenance commands. "
    "The same commands as `tillflow-edge` (the frozen binary)."
)
# From edge/terminal/service/daemon.py's docstring: what the daemon does on each signal.
RUN_EPILOG = """\
signals:
  SIGTERM  graceful stop: stop accepting, let requests in flight finish their step,
           checkpoint the WAL, exit 0 (systemctl stop)
  SIGHUP   reload the config file and the fraud policy; runs go on (systemctl reload)
  SIGINT   (Ctrl-C) as SIGTERM"""

OpenStore = Callable[[argparse.Namespace], Any]

#: What ``config check`` shows in place of a secret (the cloud enrollment token).
REDACTED = "<redacted>"


def add_commands(sub: Any, common: argparse.ArgumentParser, db: argparse.ArgumentParser) -> None:
    """``tillflow edge``: the terminal's subcommands under one ``edge`` command."""
    edge = sub.add_parser(
        "edge",
        parents=[common],
        help="terminal runtime commands (the same as tillflow-edge)",
        description=DESCRIPTION,
    )
    cmds = edge.add_subparsers(dest="edge_command", required=True, metavar="SUBCOMMAND")
    add_subcommands(cmds, common, db)


def add_subcommands(
    cmds: Any, common: argparse.ArgumentParser, db: argparse.ArgumentParser
) -> None:
    """Every terminal subcommand, into ``cmds`` (an argparse subparsers action)."""
    s = cmds.add_parser(
        "run",
        parents=[common],
        help="run the terminal daemon (local API, recovery, systemd notify) until SIGTERM",
        description="Run the terminal daemon: migrate the database, resume the runs a crash "
        "left in flight, open the POS socket, tell systemd READY=1, and serve until stopped.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")

    s = cmds.add_parser("config", parents=[common], help="terminal configuration")
    config = s.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config.add_parser(
        "check",
        parents=[common],
        help="validate a config file (with TILLFLOW_* overrides applied); print every option",
    )
    check.add_argument("file", metavar="FILE")

    s = cmds.add_parser(
        "outbox", parents=[common, db], help="outbox depth, oldest age and the next messages"
    )
    s.add_argument("--limit", type=int, default=10, help="messages to show (default 10)")

    cmds.add_parser(
        "recover", parents=[common, db], help="resume and drive every in-flight run after a crash"
    )

    s = cmds.add_parser("audit", parents=[common], help="audit log commands")
    audit = s.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    audit.add_parser("verify", parents=[common, db], help="check the audit hash chain")

    s = cmds.add_parser(
        "health", parents=[common], help="ask the running daemon GET /v1/health; exit 0 if 200"
    )
    s.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")
    s.add_argument("--timeout-s", type=float, default=HEALTH_TIMEOUT_S, metavar="S")

    s = cmds.add_parser(
        "verify-bundle",
        parents=[common],
        help="check a release bundle: Ed25519 signature of SHA256SUMS, then every file",
    )
    s.add_argument("bundle", metavar="DIR", help="an unpacked tillflow-edge-<version> bundle")
    s.add_argument("--pubkey", required=True, metavar="FILE", help="release public key (PEM)")


def run(args: argparse.Namespace, open_store: OpenStore) -> int:
    """Run the parsed terminal subcommand (``args.edge_command``)."""
    return _COMMANDS[args.edge_command](args, open_store)


def cmd_run(args: argparse.Namespace, open_store: OpenStore) -> int:
    from edge.terminal.service.daemon import Daemon

    return Daemon(Path(args.config)).run()


def cmd_config(args: argparse.Namespace, open_store: OpenStore) -> int:
    from edge.terminal.config import load_config, options

    cfg = load_config(args.file)
    dumped = cfg.model_dump(mode="json")
    if isinstance(dumped.get("cloud"), dict) and dumped["cloud"].get("enroll_token"):
        dumped["cloud"]["enroll_token"] = REDACTED  # a secret: never printed or logged
    if args.json:
        print(json.dumps(dumped, indent=2))
        return EXIT_OK
    print(f"ok   {args.file}  (device {cfg.device_id}, data in {cfg.data_dir})")
    # Each value as JSON (which YAML reads too): a path is a string, None is null.
    for name, _default, _ in options():
        value: Any = dumped
        for part in name.split("."):
            value = None if value is None else value[part]  # an absent section: null
        print(f"  {name:<40} {json.dumps(value, ensure_ascii=False)}")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace, open_store: OpenStore) -> int:
    store = open_store(args)
    stats = store.outbox_stats()
    messages = store.outbox(limit=args.limit)
    age = None if stats.oldest is None else max(0.0, time.time() - stats.oldest)
    if args.json:
        print(
            json.dumps(
                {
                    "depth": stats.depth,
                    "bytes": stats.bytes,
                    "oldest_age_s": age,
                    "last_seq": stats.last_seq,
                    "next": [
                        {"seq": m.seq, "id": m.message_id, "topic": m.topic, "run_id": m.run_id}
                        for m in messages
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    oldest = "-" if age is None else f"{age:.0f}s"
    print(f"outbox: {stats.depth} message(s), {stats.bytes} bytes, oldest {oldest} old")
    for m in messages:
        print(f"  {m.seq:>8}  {m.topic:<16} {m.message_id}  run {m.run_id}")
    return EXIT_OK


def cmd_recover(args: argparse.Namespace, open_store: OpenStore) -> int:
    from edge import cli

    return cli.cmd_recover(args)


def cmd_audit(args: argparse.Namespace, open_store: OpenStore) -> int:
    from edge import cli

    return cli.cmd_audit(args)


def cmd_health(args: argparse.Namespace, open_store: OpenStore) -> int:
    import httpx

    from edge.terminal.config import load_config

    cfg = load_config(args.config)
    transport = httpx.HTTPTransport(uds=str(cfg.socket_path))
    try:
        with httpx.Client(transport=transport, timeout=args.timeout_s, trust_env=False) as c:
            r = c.get("http://terminal/v1/health")
    except httpx.HTTPError as exc:
        print(f"unhealthy: {cfg.socket_path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(r.json(), indent=2) if args.json else f"health: {r.status_code}")
    return EXIT_OK if r.status_code == 200 else EXIT_ERROR


def cmd_verify_bundle(args: argparse.Namespace, open_store: OpenStore) -> int:
    from edge.errors import BundleInvalid
    from edge.terminal.service.release import verify_bundle

    try:
        files = verify_bundle(Path(args.bundle), Path(args.pubkey))
    except BundleInvalid as exc:
        print(f"REFUSED {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"ok   {args.bundle}: signature and {len(files)} file checksum(s) verify")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, OpenStore], int]] = {
    "run": cmd_run,
    "config": cmd_config,
    "outbox": cmd_outbox,
    "recover": cmd_recover,
    "audit": cmd_audit,
    "health": cmd_health,
    "verify-bundle": cmd_verify_bundle,
}
