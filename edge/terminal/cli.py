"""``tillflow edge ...``: the terminal's commands, mounted by ``edge.cli``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edge.terminal.config import load_config, options


def add_commands(sub: Any, common: argparse.ArgumentParser, db: argparse.ArgumentParser) -> None:
    edge = sub.add_parser("edge", parents=[common], help="terminal runtime commands")
    cmds = edge.add_subparsers(dest="edge_command", required=True, metavar="SUBCOMMAND")
    config = cmds.add_parser("config", parents=[common], help="terminal configuration")
    config_cmds = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_cmds.add_parser(
        "check",
        parents=[common],
        help="validate a config file (with TILLFLOW_* overrides applied); print the result",
    )
    check.add_argument("file", metavar="FILE")
    run = cmds.add_parser(
        "run",
        parents=[common],
        help="run the terminal daemon (local API, recovery, systemd notify) until SIGTERM",
    )
    run.add_argument("--config", required=True, metavar="FILE", help="terminal config (YAML)")
    outbox = cmds.add_parser(
        "outbox", parents=[common, db], help="outbox depth, oldest age and the next messages"
    )
    outbox.add_argument("--limit", type=int, default=10, help="messages to show (default 10)")


def run(args: argparse.Namespace, open_store: Any) -> int:
    if args.edge_command == "run":
        from edge.terminal.daemon import Daemon

        return Daemon(Path(args.config)).run()
    if args.edge_command == "config":
        cfg = load_config(args.file)
        if args.json:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        else:
            print(f"ok   {args.file}  (device {cfg.device_id}, data in {cfg.data_dir})")
            for name, _default, _ in options():
                value: Any = cfg
                for part in name.split("."):
                    value = getattr(value, part)
                print(f"  {name:<40} {value!r}")
        return 0
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
        return 0
    oldest = "-" if age is None else f"{age:.0f}s"
    print(f"outbox: {stats.depth} message(s), {stats.bytes} bytes, oldest {oldest} old")
    for m in messages:
        print(f"  {m.seq:>8}  {m.topic:<16} {m.message_id}  run {m.run_id}")
    return 0
