"""``tillflow``: the command line, a thin layer over ``edge.engine.Engine``.

Exit status: 0 success; 1 an error (one line on stderr saying what and where);
2 bad usage; 3 the command worked but the run ended FAILED, ROLLED_BACK or CANCELLED
(so a script can tell); 4 ``validate`` or ``audit verify`` found problems.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge.engine import (
    Engine,
    Executor,
    InlineExecutor,
    PollingExecutor,
    RunRecord,
    Status,
    Store,
    SystemClock,
    Worker,
)
from edge.engine.graph import to_mermaid
from edge.engine.imports import add_search_paths
from edge.engine.loader import Workflow, load_file
from edge.errors import ConfigError, DefinitionError, Problem, TillflowError
from edge.store import DATABASE_URL_ENV, open_store
from edge.terminal.service import commands as terminal_cli

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_RUN_FAILED, EXIT_PROBLEMS = 0, 1, 2, 3, 4
#: Entry-point group of commands other distributions add to ``tillflow`` (the cloud
#: extra's ``cloud``), so this module never imports them. Each entry point is a
#: ``register(subparsers, common) -> handler`` that adds the subcommand named as the
#: entry point; ``handler(args) -> exit status`` runs it.
COMMANDS_GROUP = "tillflow.commands"
_UNHAPPY = {Status.FAILED, Status.ROLLED_BACK, Status.CANCELLED}


def parent_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options every command shares (``common``) and those of the commands that
    open a database (``db``); ``tillflow-edge`` (edge.terminal.service.main) mounts them too."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--path",
        dest="search_paths",
        action="append",
        default=[],
        metavar="DIR",
        help="directory to import step modules from (repeatable; PYTHONPATH works too)",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument("-v", "--verbose", action="store_true", help="log engine activity")
    db = argparse.ArgumentParser(add_help=False)
    where = db.add_mutually_exclusive_group()
    where.add_argument("--db", metavar="FILE", help="SQLite database file (created if missing)")
    where.add_argument(
        "--database-url",
        metavar="URL",
        help="a database URL: postgresql://USER@HOST:PORT/DB, or sqlite:///PATH "
        f"(default: ${DATABASE_URL_ENV})",
    )
    db.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite durability: FULL survives power loss (default), NORMAL is faster",
    )
    return common, db


def _parser() -> argparse.ArgumentParser:
    common, db = parent_parsers()
    p = argparse.ArgumentParser(
        prog="tillflow",
        description="Durable YAML workflows on SQLite: validate, draw, run, resume, inspect, "
        "recover.",
        epilog="Example: tillflow run edge/examples/payment.yaml --db /tmp/t.db "
        '--input \'{"amount": 1250, "currency": "EUR"}\'',
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "validate", parents=[common], help="check workflow YAML; report every problem"
    )
    s.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or directories of them")

    s = sub.add_parser("graph", parents=[common], help="print a Mermaid diagram of a workflow")
    s.add_argument("path", metavar="PATH")

    s = sub.add_parser(
        "run", parents=[common, db], help="start a run and drive it until it ends or waits"
    )
    s.add_argument(
        "path", metavar="PATH", help="workflow YAML, or a directory (all its YAML is registered)"
    )
    s.add_argument(
        "--workflow", metavar="TYPE", help="which workflow_type to start when PATH is a directory"
    )
    s.add_argument(
        "--input", default="{}", metavar="JSON", help="run input: JSON text, or @file.json"
    )
    s.add_argument(
        "--idempotency-key", metavar="KEY", help="starting twice with one key gives one run"
    )

    s = sub.add_parser(
        "resume", parents=[common, db], help="answer a WAIT step and drive the run on"
    )
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--input", default="{}", metavar="JSON", help="JSON text, or @file.json")

    s = sub.add_parser(
        "show", parents=[common, db], help="state, step history and audit trail of a run"
    )
    s.add_argument("run_id", metavar="RUN_ID")

    s = sub.add_parser("list", parents=[common, db], help="list runs, newest first")
    s.add_argument("--status", choices=[str(x) for x in Status], help="only runs with this status")
    s.add_argument("--limit", type=int, default=50)

    s = sub.add_parser(
        "worker",
        parents=[common, db],
        help="claim and advance due runs until SIGTERM/SIGINT (many may share a database)",
    )
    s.add_argument("--batch", type=int, default=8, help="runs claimed per poll (default 8)")
    s.add_argument("--poll-s", type=float, default=0.2, help="idle wait between polls (s)")

    sub.add_parser(
        "recover", parents=[common, db], help="resume and drive every in-flight run after a crash"
    )

    s = sub.add_parser("cancel", parents=[common, db], help="cancel a run")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--reason", default="cancelled from the command line")
    s.add_argument(
        "--compensate", action="store_true", help="undo its completed steps first (saga)"
    )

    s = sub.add_parser("audit", parents=[common], help="audit log commands")
    audit = s.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    audit.add_parser(
        "verify",
        parents=[common, db],
        help="check the audit hash chain; report the first broken link",
    )

    terminal_cli.add_commands(sub, common, db)

    s = sub.add_parser("db", parents=[common], help="database schema commands")
    dbsub = s.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    dbsub.add_parser("migrate", parents=[common, db], help="apply pending migrations")
    dbsub.add_parser("status", parents=[common, db], help="show the schema version")
    _add_plugin_commands(sub, common)
    return p


def _add_plugin_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Mount the ``tillflow.commands`` entry points; one whose extra is not installed
    (its import fails) is left out, and ``tillflow`` works without it."""
    # Here, not at import: importlib.metadata (with email, zipfile, csv) is ~4 MB that
    # tillflow-edge, which imports this module for its parser, never needs.
    from importlib.metadata import entry_points

    for ep in entry_points(group=COMMANDS_GROUP):
        if ep.name in _COMMANDS or ep.name in sub.choices:
            continue
        try:
            register = ep.load()
        except ImportError as exc:
            logging.getLogger(__name__).debug("command %s left out: %s", ep.name, exc)
            continue
        handler = register(sub, common)
        sub.choices[ep.name].set_defaults(plugin_command=handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return execute(args, getattr(args, "plugin_command", None) or _COMMANDS[args.command])


def execute(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run one parsed command: logging, search paths, errors to exit codes, cleanup."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    add_search_paths(args.search_paths)
    args.opened = []
    try:
        return int(command(args))
    except (DefinitionError, ConfigError) as exc:  # several problems: show them all
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except TillflowError as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return EXIT_ERROR
    finally:
        for thing in args.opened:
            thing.close()


# --- helpers -------------------------------------------------------------------------


def _yaml_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        return sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
    if not p.exists():
        raise ConfigError(f"{path}: no such file or directory")
    return [p]


def _input(text: str) -> dict[str, Any]:
    source = "--input"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read input file {source}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(data).__name__}")
    return data


def _database_url(args: argparse.Namespace) -> str:
    url = args.db or args.database_url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigError(
            "no database given",
            hint=f"pass --db FILE or --database-url URL, or set {DATABASE_URL_ENV}",
        )
    return str(url)


def _store(args: argparse.Namespace, *, migrate: bool = True) -> Store:
    store = open_store(_database_url(args), synchronous=args.synchronous, migrate=migrate)
    args.opened.append(store)
    return store


def _engine(args: argparse.Namespace, executor: Executor | None = None) -> Engine:
    store = _store(args)
    engine = Engine(store, executor or InlineExecutor(sleep=True), clock=SystemClock())
    args.opened.insert(0, engine)
    return engine


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _run_line(run: RunRecord) -> str:
    line = f"run {run.run_id}  {run.workflow_type}  {run.status}"
    if run.error and run.status in _UNHAPPY:
        line += f"  ({run.error.get('step', '-')}: {run.error.get('message')})"
    if run.status is Status.WAITING:
        line += f"  (waiting at {_current_step(run)}; answer with: "
        line += f"tillflow resume {run.run_id} --input JSON)"
    return line


def _current_step(run: RunRecord) -> str:
    frames = run.cursor.get("frames") or []
    return str(frames[-1][0]) if frames else "-"


def _status_exit(run: RunRecord) -> int:
    return EXIT_RUN_FAILED if run.status in _UNHAPPY else EXIT_OK


# --- commands ------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    problems = 0
    for path in args.paths:
        for f in _yaml_files(path):
            try:
                wf = load_file(f)
                results.append(
                    {
                        "file": str(f),
                        "ok": True,
                        "workflow_type": wf.workflow_type,
                        "version": wf.version,
                    }
                )
            except DefinitionError as exc:
                problems += len(exc.problems)
                results.append(
                    {
                        "file": str(f),
                        "ok": False,
                        "problems": [dataclasses.asdict(p) for p in exc.problems],
                    }
                )
    lines = []
    for r in results:
        if r["ok"]:
            lines.append(f"ok   {r['file']}  ({r['workflow_type']} v{r['version']})")
        else:
            lines.append(f"FAIL {r['file']}")
            lines += [f"  {Problem(**p)}" for p in r["problems"]]
    lines.append(f"{problems} problem(s) in {len(results)} file(s)")
    _emit(args, results, "\n".join(lines))
    return EXIT_PROBLEMS if problems else EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    print(to_mermaid(load_file(args.path)))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    files = _yaml_files(args.path)
    run_input = _input(args.input)
    engine = _engine(args)
    workflows: list[Workflow] = [engine.register(load_file(f)) for f in files]
    if args.workflow:
        wtype = args.workflow
    elif len(workflows) == 1:
        wtype = workflows[0].workflow_type
    else:
        types = ", ".join(sorted(w.workflow_type for w in workflows))
        raise ConfigError(
            f"{args.path} holds several workflows ({types}); choose one with --workflow"
        )
    run_id = engine.start(wtype, run_input, idempotency_key=args.idempotency_key)
    run = engine.get(run_id)
    _emit(args, _run_json(run), _run_line(run))
    return _status_exit(run)


def cmd_resume(args: argparse.Namespace) -> int:
    engine = _engine(args)
    engine.resume(args.run_id, _input(args.input))
    run = engine.get(args.run_id)
    _emit(args, _run_json(run), _run_line(run))
    return _status_exit(run)


def _run_json(run: RunRecord) -> dict[str, Any]:
    return dataclasses.asdict(run) | {"status": str(run.status)}


def cmd_show(args: argparse.Namespace) -> int:
    view = _engine(args).show(args.run_id)
    run = view.run
    if args.json:
        _emit(
            args,
            {
                "run": _run_json(run),
                "steps": [dataclasses.asdict(s) for s in view.steps],
                "audit": [dataclasses.asdict(a) for a in view.audit],
            },
            "",
        )
        return EXIT_OK
    out = [_run_line(run), f"  started {_when(run.created_at)}   updated {_when(run.updated_at)}"]
    if run.idempotency_key:
        out.append(f"  idempotency key {run.idempotency_key}")
    if run.parent_run_id:
        out.append(f"  parent run {run.parent_run_id}")
    out.append("state:")
    out += ["  " + ln for ln in json.dumps(run.state, indent=2, sort_keys=True).splitlines()]
    out.append("steps:")
    out.append(f"  {'#':>3}  {'step':<28} {'kind':<12} {'status':<10} {'try':>3} {'ms':>8}")
    for s in view.steps:
        ms = (s.finished_at - s.started_at) * 1000
        note = f"  {s.error['message']}" if s.error else ""
        out.append(
            f"  {s.seq:>3}  {s.step:<28} {s.kind:<12} {s.status:<10} {s.attempt:>3} {ms:>8.1f}"
            + note
        )
    out.append("audit:")
    for a in view.audit:
        detail = json.dumps(a.detail, sort_keys=True) if a.detail else ""
        out.append(f"  {a.seq:>5}  {_when(a.at)}  {a.event:<28} {a.step or '':<20} {detail}")
    print("\n".join(out))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    runs = _engine(args).list_runs(Status(args.status) if args.status else None, args.limit)
    text = (
        "\n".join(
            f"{r.run_id}  {r.workflow_type:<20} {r.status:<12} {_current_step(r):<20} "
            + _when(r.updated_at)
            for r in runs
        )
        or "no runs"
    )
    _emit(args, [_run_json(r) for r in runs], text)
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    engine = _engine(args)
    ids = engine.recover()
    runs = [engine.get(i) for i in ids]
    text = "\n".join([f"recovered {len(ids)} run(s)", *(_run_line(r) for r in runs)])
    _emit(args, [_run_json(r) for r in runs], text)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    engine = _engine(args)
    engine.cancel(args.run_id, args.reason, compensate=args.compensate)
    run = engine.get(args.run_id)
    _emit(args, _run_json(run), _run_line(run))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    report = _engine(args).verify_audit()
    _emit(args, dataclasses.asdict(report), str(report))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def cmd_db(args: argparse.Namespace) -> int:
    store = _store(args, migrate=args.db_command == "migrate")
    version = store.schema_version()
    where = getattr(store, "path", _database_url(args))
    _emit(args, {"db": where, "schema_version": version}, f"{where}: schema version {version}")
    return EXIT_OK


def cmd_edge(args: argparse.Namespace) -> int:
    return terminal_cli.run(args, _store)


def cmd_worker(args: argparse.Namespace) -> int:
    engine = _engine(args, PollingExecutor())
    worker = Worker(engine, batch=args.batch, poll_s=args.poll_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"worker {engine.owner} polling; SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)
    stats = worker.run(stop)
    _emit(args, dataclasses.asdict(stats), f"worker stopped: {stats.claimed} run(s) advanced")
    return EXIT_OK


_COMMANDS = {
    "validate": cmd_validate,
    "graph": cmd_graph,
    "run": cmd_run,
    "resume": cmd_resume,
    "show": cmd_show,
    "list": cmd_list,
    "recover": cmd_recover,
    "cancel": cmd_cancel,
    "audit": cmd_audit,
    "db": cmd_db,
    "worker": cmd_worker,
    "edge": cmd_edge,
}

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
