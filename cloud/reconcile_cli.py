"""``tillflow cloud reconcile ACCOUNTS.jsonl``: the terminals' own accounts held against
what the cloud holds (``cloud.fleet.reconcile``; a ``cloud/cli.py`` plugin). Exit 0 when
every check holds, 4 when one does not (each named, with examples; as ``audit verify``
exits for a broken chain); ``--json`` prints the whole result.

Only argparse is imported here; the rest when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def add_parsers(
    cloud: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    common: argparse.ArgumentParser,
    db: argparse.ArgumentParser,
    key: argparse.ArgumentParser,
) -> dict[str, Handler]:
    p = cloud.add_parser(
        "reconcile",
        parents=[common, db],
        help="check terminals' accounts against the cloud (exit 4: a violation)",
        description="Read terminals' accounts (JSON lines: device_id, stream, payments, "
        "approved, outbox_last_seq, outbox_depth, audit_head) and check that every approved "
        "sale is in the cloud exactly once, no cloud sale is unknown to its terminal, every "
        "message arrived once, no outbox is undrained, every audit chain verifies and ends "
        "at the terminal's head, nothing is quarantined. Reads only.",
    )
    p.add_argument("accounts", metavar="ACCOUNTS.jsonl", help="one terminal's account a line")
    return {"reconcile": _reconcile}


def _reconcile(args: argparse.Namespace) -> int:
    import json

    import psycopg

    from cloud.cli import database_url
    from cloud.fleet.reconcile import TerminalAccount, reconcile
    from edge.errors import ConfigError

    try:
        with open(args.accounts, encoding="utf-8") as f:
            accounts = [TerminalAccount.parse(line) for line in f if line.strip()]
    except OSError as exc:
        raise ConfigError(f"{args.accounts}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{args.accounts}: not terminal accounts ({exc!r})") from None
    with psycopg.connect(database_url(args)) as conn:
        result = reconcile(conn, accounts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for c in result["checks"]:
            mark = "ok  " if c["ok"] else "FAIL"
            print(f"{mark} {c['name']}: {c['checked']} checked, {c['violations']} violation(s)")
            for e in c["examples"]:
                print(f"       {e}")
    return 0 if result["ok"] else 4
