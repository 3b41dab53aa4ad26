"""``tillflow-edge``: the terminal's command and the frozen binary's entry point, with sync.

Everything ``edge.terminal.service.main`` mounts (the same functions, so a command
behaves alike from source, frozen, and as ``tillflow edge``), and what needs ``sync``,
which sits above ``edge``::

    tillflow-edge enroll --config FILE [--url URL] [--token T]
                                           enroll with the control plane (once)
    tillflow-edge run --config FILE        the daemon; with a ``cloud:`` section it also
                                           syncs (and enrolls first from cloud.enroll_token)

``tillflow edge run`` (edge.cli) is the daemon without sync: edge never imports sync.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

ENROLL_HELP = "enroll this terminal with the control plane (its key stays here, mode 0600)"
ROTATE_HELP = "replace this terminal's device key with a new one the cloud takes"


def _parser() -> argparse.ArgumentParser:
    from edge.cli import parent_parsers
    from edge.terminal.service import commands as terminal_cli
    from edge.terminal.service.main import VersionAction

    common, db = parent_parsers()
    p = argparse.ArgumentParser(
        prog="tillflow-edge",
        description="The Tillflow payment terminal: the daemon beside the POS app, its "
        "sync with the control plane and its maintenance commands (from source also "
        "`tillflow edge COMMAND`, without sync).",
    )
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="edge_command", required=True, metavar="COMMAND")
    terminal_cli.add_subcommands(sub, common, db)
    s = sub.add_parser(
        "enroll",
        parents=[common],
        help=ENROLL_HELP,
        description=ENROLL_HELP + ". It makes the device key, sends its public half with "
        "the one-time token, and pins the control plane's command-signing key. The URL and "
        "token default to the config's cloud.url and cloud.enroll_token.",
    )
    s.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")
    s.add_argument("--url", metavar="URL", help="control plane base URL (default: cloud.url)")
    s.add_argument(
        "--token", metavar="T", help="one-time enrollment token (default: cloud.enroll_token)"
    )
    r = sub.add_parser(
        "rotate-key",
        parents=[common],
        help=ROTATE_HELP,
        description=ROTATE_HELP + ". The new key is kept beside the old one until the cloud "
        "has taken it (the request is signed by the current key, with the new key's "
        "signature as proof); a lost answer is finished by running it again, or by the "
        "daemon's next sync. A running daemon picks the new key up by itself.",
    )
    r.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")
    return p


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from edge.terminal.config import load_config
    from sync.device.identity import load_identity, rotate_key

    cfg = load_config(args.config)
    url = cfg.cloud.url if cfg.cloud else None
    timeout = cfg.cloud.timeout_s if cfg.cloud else 10.0
    public = rotate_key(cfg.data_dir, url=url, timeout_s=timeout)
    identity = load_identity(cfg.data_dir)
    device = identity.device_id if identity else "?"
    if args.json:
        print(json.dumps({"device_id": device, "public_key": public}, indent=2))
    else:
        print(f"device {device} now signs with key {public}")
    return 0


def sync(terminal: Any, stop: threading.Event) -> None:
    """The daemon's sync service, imported only by a terminal whose config has a
    ``cloud:`` section: one without never loads the sync client (idle RSS, start time)."""
    if terminal.cfg.cloud is None:
        return
    from sync.device.service import SyncService

    SyncService()(terminal, stop)


def cmd_run(args: argparse.Namespace) -> int:
    from edge.terminal.service.daemon import Daemon

    return Daemon(Path(args.config), background=[sync]).run()


def cmd_enroll(args: argparse.Namespace) -> int:
    from edge.errors import ConfigError
    from edge.terminal.config import load_config
    from edge.terminal.service.main import build_info
    from sync.device.identity import enroll, identity_path

    cfg = load_config(args.config)
    url = args.url or (cfg.cloud.url if cfg.cloud else None)
    token = args.token or (cfg.cloud.enroll_token if cfg.cloud else None)
    if not url or not token:
        missing = " and ".join(n for n, v in (("--url", url), ("--token", token)) if not v)
        raise ConfigError(
            f"enroll needs {missing}",
            hint=f"pass it, or set cloud.url / cloud.enroll_token in {args.config}",
        )
    timeout = cfg.cloud.timeout_s if cfg.cloud else 10.0
    identity = enroll(
        url, token, cfg.data_dir, build_info()["version"] or "unknown", timeout_s=timeout
    )
    if args.json:
        print(json.dumps({"device_id": identity.device_id, "store": identity.store,
                          "group": identity.group, "url": identity.url}, indent=2))  # fmt: skip
    else:
        print(
            f"enrolled as device {identity.device_id} (store {identity.store}) at "
            f"{identity.url}; identity in {identity_path(cfg.data_dir)}"
        )
    return 0


def _command(args: argparse.Namespace) -> int:
    from edge import cli
    from edge.terminal.service import commands as terminal_cli

    if args.edge_command == "run":
        return cmd_run(args)
    if args.edge_command == "enroll":
        return cmd_enroll(args)
    if args.edge_command == "rotate-key":
        return cmd_rotate_key(args)
    return terminal_cli.run(args, cli._store)


def main(argv: Sequence[str] | None = None) -> int:
    from edge.cli import execute

    args = _parser().parse_args(argv)
    return execute(args, _command)


if __name__ == "__main__":
    raise SystemExit(main())
