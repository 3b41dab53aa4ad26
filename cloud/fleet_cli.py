"""``tillflow cloud api-token create|list|revoke``: the Fleet API's tokens, straight on
the database (a ``cloud/cli.py`` plugin). ``create`` is how the first admin token comes
to be: it prints the token once (stored hashed, never shown again).

Only argparse is imported here; the rest when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]

#: As ``cloud.fleet.tokens.ROLES`` (not imported: keep this light; a test holds them equal).
ROLES = ("admin", "operator", "auditor", "read_only")


def add_parsers(
    cloud: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    common: argparse.ArgumentParser,
    db: argparse.ArgumentParser,
    key: argparse.ArgumentParser,
) -> dict[str, Handler]:
    p = cloud.add_parser(
        "api-token",
        parents=[common],
        help="the Fleet API's tokens (roles: admin, operator, auditor, read_only)",
        description="Make, list and revoke Fleet API tokens on the database directly "
        "(the first admin token is made this way; later ones through the API).",
    )
    sub = p.add_subparsers(dest="api_token_command", required=True, metavar="SUBCOMMAND")
    c = sub.add_parser(
        "create",
        parents=[common, db],
        help="make a token (printed once; stored hashed)",
        description="Make an API token: its clear text is printed once, on stdout, and "
        "kept nowhere (only its SHA-256). Callers send it as Authorization: Bearer TOKEN.",
    )
    c.add_argument("--name", required=True, help="who or what holds it (shown in the audit log)")
    c.add_argument("--role", required=True, choices=ROLES, help="what it may do")
    sub.add_parser("list", parents=[common, db], help="every token: id, name, role, use")
    r = sub.add_parser("revoke", parents=[common, db], help="revoke a token (its next use is 401)")
    r.add_argument("token_id", metavar="ID", help="the token's id (tok_...)")

    return {"api-token": _api_token}


def _api_token(args: argparse.Namespace) -> int:
    import dataclasses
    import getpass
    import json
    import sys

    from cloud.api.serve import migrate_fleet
    from cloud.cli import database_url
    from cloud.fleet import audit, tokens
    from cloud.sync.postgres import PostgresSyncBackend
    from edge.engine.clock import SystemClock
    from edge.errors import ConfigError

    backend = PostgresSyncBackend(database_url(args), pool_size=2)
    args.opened.append(backend)
    migrate_fleet(backend)
    now = SystemClock().now()
    actor = f"cli:{getpass.getuser()}"

    def show(data: Any, text: str) -> None:
        print(json.dumps(data, indent=2, default=str) if args.json else text)

    with backend.pool.connection() as conn, conn.transaction():
        if args.api_token_command == "create":
            try:
                token, made = tokens.create(conn, args.name, args.role, at=now, by=actor)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            audit.append(
                conn, actor=actor, actor_token=None, actor_role=None,
                action="api_token.create", target=made.token_id,
                detail={"name": made.name, "role": made.role}, at=now,
            )  # fmt: skip
            show(
                {"token": token, "token_id": made.token_id, "name": made.name, "role": made.role},
                token,
            )
            if not args.json:
                print(
                    f"{made.token_id} ({made.role}) for {made.name}: shown once, keep it safe",
                    file=sys.stderr,
                )
            return 0
        if args.api_token_command == "revoke":
            revoked = tokens.revoke(conn, args.token_id, at=now, by=actor)
            if revoked is None:
                raise ConfigError(f"no API token {args.token_id}")
            audit.append(
                conn, actor=actor, actor_token=None, actor_role=None,
                action="api_token.revoke", target=revoked.token_id, detail={}, at=now,
            )  # fmt: skip
            show({"token_id": revoked.token_id, "revoked_at": revoked.revoked_at},
                 f"API token {revoked.token_id} revoked")  # fmt: skip
            return 0
        rows, after = [], None
        while True:
            page = tokens.tokens(conn, after=after, limit=1000)
            rows.extend(page)
            if len(page) < 1000:
                break
            after = page[-1].token_id
    data = [dataclasses.asdict(t) for t in rows]
    lines = [f"{'id':<21} {'role':<10} {'state':<8} name"]
    for t in rows:
        lines.append(
            f"{t.token_id:<21} {t.role:<10} {'revoked' if t.revoked_at else 'live':<8} {t.name}"
        )
    show(data, "\n".join(lines) if rows else "no API tokens")
    return 0
