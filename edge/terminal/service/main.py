"""The terminal's commands as one parser: what ``tillflow-edge`` is made of.

The ``tillflow-edge`` console script and the frozen binary's entry point are
``sync.device.main``, which mounts these same commands and adds what needs ``sync``
(``enroll``, the daemon with its sync client); edge never imports sync. This module keeps
``build_info`` and ``--version`` for it, and ``main`` for the commands without sync.

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

The commands are ``edge.terminal.service.commands``'s (where imports stay inside each command, so
the daemon does not load what only the other commands use), as under ``tillflow edge``.
The parser is built from ``edge.cli``'s shared parsers, which import the engine: even
``--version`` takes about 0.24 s and 36 MB (moving those parsers out of ``edge.cli``
would fix it).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VersionAction", "build_info", "main", "version_line"]

#: Module the PyInstaller spec (packaging/tillflow-edge.spec) writes at build time.
BUILD_INFO_MODULE = "tillflow_build_info"
#: How long ``--version`` from source waits for ``git rev-parse`` (s).
GIT_TIMEOUT_S = 2.0


def build_info() -> dict[str, str | None]:
    """Version, git commit and build date, baked in by the build. From source: the
    installed version, the checkout's short commit (None outside a git checkout) and
    ``built`` None."""
    try:
        baked = importlib.import_module(BUILD_INFO_MODULE)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("tillflow")
        except PackageNotFoundError:
            v = "unknown"
        return {"version": v, "commit": _source_commit(), "built": None}
    return {"version": baked.VERSION, "commit": baked.COMMIT, "built": baked.BUILT}


def _source_commit() -> str | None:
    """The short commit of the checkout this code runs from, when it is one."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():  # installed, not a checkout: no other repo's commit
        return None
    import subprocess  # here: the daemon, which imports this module, never runs git

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def version_line() -> str:
    b = build_info()
    if b["built"] is None:
        commit = f", commit {b['commit']}" if b["commit"] else ""
        return f"tillflow-edge {b['version']} (from source{commit})"
    return f"tillflow-edge {b['version']} (commit {b['commit']}, built {b['built']})"


class VersionAction(argparse.Action):
    """``--version`` that reads the build info only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print version, commit, build date")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_line())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    from edge.cli import parent_parsers
    from edge.terminal.service import commands as terminal_cli

    common, db = parent_parsers()
    p = argparse.ArgumentParser(
        prog="tillflow-edge",
        description="The Tillflow payment terminal: the daemon beside the POS app and its "
        "maintenance commands (from source also `tillflow edge COMMAND`).",
    )
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="edge_command", required=True, metavar="COMMAND")
    terminal_cli.add_subcommands(sub, common, db)
    return p


def _command(args: argparse.Namespace) -> int:
    from edge import cli
    from edge.terminal.service import commands as terminal_cli

    return terminal_cli.run(args, cli._store)


def main(argv: Sequence[str] | None = None) -> int:
    from edge.cli import execute

    args = _parser().parse_args(argv)
    return execute(args, _command)


if __name__ == "__main__":
    raise SystemExit(main())
