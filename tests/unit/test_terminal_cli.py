"""``tillflow edge`` and ``tillflow-edge`` (``edge.terminal.service.main``): one set of terminal
commands, described, with the daemon's signals in ``run --help`` and an honest
``--version`` from source."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.cli import main as tillflow
from edge.terminal.service.main import main as tillflow_edge

REPO = Path(__file__).resolve().parents[2]
TERMINAL_COMMANDS = {"run", "config", "outbox", "recover", "audit", "health", "verify-bundle"}


def help_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def commands_in(help_text: str) -> set[str]:
    """The subcommand names argparse lists (indented four spaces under the metavar)."""
    return set(re.findall(r"^    (\S+)", help_text, flags=re.M))


def test_edge_help__has_a_description_and_lists_every_tillflow_edge_command(capsys):
    edge_help = help_of(tillflow, ["edge"], capsys)
    binary_help = help_of(tillflow_edge, [], capsys)
    assert commands_in(binary_help) == TERMINAL_COMMANDS
    assert commands_in(edge_help) == TERMINAL_COMMANDS
    description = edge_help.split("\n\n")[1]
    assert "payment terminal" in description and "tillflow-edge" in description


@pytest.mark.parametrize("main, argv", [(tillflow, ["edge", "run"]), (tillflow_edge, ["run"])])
def test_run_help__says_what_sigterm_and_sighup_do(capsys, main, argv):
    out = help_of(main, argv, capsys)
    assert re.search(r"SIGTERM\s+graceful stop", out)
    assert re.search(r"SIGHUP\s+reload the config file and the fraud policy", out)


@pytest.mark.parametrize("argv", [["edge", "recover"], ["edge", "audit", "verify"]])
def test_edge__recover_and_audit_verify_run_from_tillflow_edge_too(capsys, tmp_path, argv):
    db = str(tmp_path / "t.db")
    assert tillflow([*argv, "--db", db]) == 0
    from_edge = capsys.readouterr().out
    assert tillflow_edge([*argv[1:], "--db", db]) == 0
    assert capsys.readouterr().out == from_edge != ""


def test_version__from_source_says_so_and_names_the_checkout_commit(capsys):
    with pytest.raises(SystemExit) as info:
        tillflow_edge(["--version"])
    assert info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert "not built" not in line
    if (REPO / ".git").exists() and shutil.which("git"):
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert line == f"tillflow-edge 0.1.0 (from source, commit {sha})"
    else:
        assert line == "tillflow-edge 0.1.0 (from source)"
