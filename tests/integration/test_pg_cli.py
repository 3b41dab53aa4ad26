"""The tillflow CLI on PostgreSQL: --database-url and TILLFLOW_DATABASE_URL select it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edge.examples
from edge.cli import main
from edge.store.queries import load_migrations

PAYMENT = str(Path(edge.examples.__file__).with_name("payment.yaml"))


def test_cli__db_status_and_migrate_on_a_new_postgresql_database(new_database, capsys):
    url = new_database()
    assert main(["db", "status", "--database-url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema_version"] == 0
    assert main(["db", "migrate", "--database-url", url, "--json"]) == 0
    latest = len(load_migrations("postgresql", package="cloud.store"))
    assert json.loads(capsys.readouterr().out)["schema_version"] == latest == 6


def test_cli__run_list_show_and_audit_verify_on_postgresql(pg_url, capsys):
    args = ["--database-url", pg_url]
    run_input = '{"amount": 1250, "currency": "EUR"}'
    assert main(["run", PAYMENT, *args, "--input", run_input, "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["status"] == "COMPLETED"
    assert main(["list", *args, "--status", "COMPLETED", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [run["run_id"]]
    assert main(["show", run["run_id"], *args]) == 0
    assert "record_sale" in capsys.readouterr().out
    assert main(["audit", "verify", *args]) == 0
    assert "audit chain ok" in capsys.readouterr().out


def test_cli__tillflow_database_url_is_the_default_database(pg_url, capsys, monkeypatch):
    monkeypatch.setenv("TILLFLOW_DATABASE_URL", pg_url)
    assert main(["run", PAYMENT, "--input", '{"amount": 5, "currency": "EUR"}', "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    monkeypatch.delenv("TILLFLOW_DATABASE_URL")
    assert main(["show", run_id, "--database-url", pg_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["status"] == "COMPLETED"


def test_cli__without_any_database_says_how_to_give_one(capsys):
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "--db FILE or --database-url URL" in err and "TILLFLOW_DATABASE_URL" in err


@pytest.mark.parametrize("both", [["--db", "x.db", "--database-url", "postgresql://h/d"]])
def test_cli__db_and_database_url_are_exclusive(both, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["list", *both])
    assert exc.value.code == 2
