"""``tillflow-edge``: the terminal's own command, and the frozen binary's entry point.

It mounts the terminal's commands of ``tillflow`` (the same functions, so a command
behaves alike from source and frozen) without the engine-only and cloud commands::

    tillflow-edge run --config FILE        the daemon (systemd ExecStart=)
    tillflow-edge config check FILE        validate a config, print every option
    tillflow-edge outbox --db FILE         outbox depth, age, next messages
    tillflow-edge recover --db FILE        resume every run a crash left in flight
    tillflow-edge audit verify --db FILE   check the audit hash chain
    tillflow-edge health --config FILE     GET /v1/health over the POS socket (installer)
    tillflow-edge verify-bundle DIR --pubkey FILE   a release bundle's signature + sums
    tillflow-edge --version                version, git commit, build date

Imports stay inside the commands, so the daemon does not load what only the other
commands use. The parser is built from ``edge.cli``'s shared parsers, which import the
engine: even ``--version`` takes about 0.24 s and 36 MB (moving those parsers out of
``edge.cli`` would fix it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_info", "main"]

#: Module the PyInstaller spec (packaging/tillflow-edge.spec) writes at build time.
BUILD_INFO_MODULE = "tillflow_build_info"
EXIT_OK, EXIT_ERROR, EXIT_PROBLEMS = 0, 1, 4
#: How long ``health`` waits for the daemon's answer (s).
HEALTH_TIMEOUT_S = 5.0


def build_info() -> dict[str, str]:
    """Version, git commit and build date: baked in by the build, or ``source``."""
    try:
        baked = importlib.import_module(BUILD_INFO_MODULE)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("tillflow")
        except PackageNotFoundError:
            v = "unknown"
        return {"version": v, "commit": "source", "built": "not built"}
    return {"version": baked.VERSION, "commit": baked.COMMIT, "built": baked.BUILT}


def _version_line() -> str:
    b = build_info()
    return f"tillflow-edge {b['version']} (commit {b['commit']}, built {b['built']})"


class _VersionAction(argparse.Action):
    """``--version`` that reads the build info only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print version, commit, build date")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_version_line())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    from edge.cli import parent_parsers

    common, db = parent_parsers()
    p = argparse.ArgumentParser(
        prog="tillflow-edge",
        description="The Tillflow payment terminal: the daemon beside the POS app and its "
        "maintenance commands.",
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "run", parents=[common], help="run the terminal daemon until SIGTERM (systemd notify)"
    )
    s.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")

    s = sub.add_parser("config", parents=[common], help="terminal configuration")
    config = s.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config.add_parser(
        "check", parents=[common], help="validate a config (TILLFLOW_* overrides applied)"
    )
    check.add_argument("file", metavar="FILE")

    s = sub.add_parser(
        "outbox", parents=[common, db], help="outbox depth, oldest age and the next messages"
    )
    s.add_argument("--limit", type=int, default=10, help="messages to show (default 10)")

    sub.add_parser(
        "recover", parents=[common, db], help="resume and drive every in-flight run after a crash"
    )

    s = sub.add_parser("audit", parents=[common], help="audit log commands")
    audit = s.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    audit.add_parser("verify", parents=[common, db], help="check the audit hash chain")

    s = sub.add_parser(
        "health", parents=[common], help="ask the running daemon GET /v1/health; exit 0 if 200"
    )
    s.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")
    s.add_argument("--timeout-s", type=float, default=HEALTH_TIMEOUT_S, metavar="S")

    s = sub.add_parser(
        "verify-bundle",
        parents=[common],
        help="check a release bundle: Ed25519 signature of SHA256SUMS, then every file",
    )
    s.add_argument("bundle", metavar="DIR", help="an unpacked tillflow-edge-<version> bundle")
    s.add_argument("--pubkey", required=True, metavar="FILE", help="release public key (PEM)")
    return p


def cmd_terminal(args: argparse.Namespace) -> int:
    """``run``, ``config check``, ``outbox``: the ``tillflow edge`` commands."""
    from edge import cli
    from edge.terminal import cli as terminal_cli

    args.edge_command = args.command
    return terminal_cli.run(args, cli._store)


def cmd_recover(args: argparse.Namespace) -> int:
    from edge import cli

    return cli.cmd_recover(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from edge import cli

    return cli.cmd_audit(args)


def cmd_health(args: argparse.Namespace) -> int:
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


def cmd_verify_bundle(args: argparse.Namespace) -> int:
    from edge.errors import BundleInvalid
    from edge.terminal.release import verify_bundle

    try:
        files = verify_bundle(Path(args.bundle), Path(args.pubkey))
    except BundleInvalid as exc:
        print(f"REFUSED {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"ok   {args.bundle}: signature and {len(files)} file checksum(s) verify")
    return EXIT_OK


_COMMANDS = {
    "run": cmd_terminal,
    "config": cmd_terminal,
    "outbox": cmd_terminal,
    "recover": cmd_recover,
    "audit": cmd_audit,
    "health": cmd_health,
    "verify-bundle": cmd_verify_bundle,
}


def main(argv: Sequence[str] | None = None) -> int:
    from edge.cli import execute

    args = _parser().parse_args(argv)
    return execute(args, _COMMANDS[args.command])


if __name__ == "__main__":
    raise SystemExit(main())
