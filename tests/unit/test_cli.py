"""The ``tillflow`` command, driven in-process through ``edge.cli.main``: exit codes,
what it prints, and that it reads and writes the database it is given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import apsw
import pytest

import edge.examples
from edge.cli import main
from edge.store.queries import load_migrations

PAYMENT = Path(edge.examples.__file__).parent / "payment.yaml"
GOOD_INPUT = '{"amount": 1250, "currency": "EUR"}'

# The jammed printer of payment.yaml without its retry backoff (which sleeps in real time).
SAGA_YAML = """\
workflow_type: quick_payment
version: 1
saga: true
steps:
  - name: reserve_funds
    type: STANDARD
    function: edge.examples.steps:reserve_funds
    compensate: edge.examples.steps:release_funds
  - name: print_receipt
    type: STANDARD
    function: edge.examples.steps:print_receipt
"""

WAIT_YAML = """\
workflow_type: pin_entry
version: 1
steps:
  - name: await_pin
    type: WAIT
  - name: validate
    type: STANDARD
    function: edge.examples.steps:validate
"""

STEPS_MODULE = "tillflow_cli_test_steps"
STEPS_SOURCE = """\
def check_pin(state, ctx):
    return {"pin_ok": state.get("pin") == "1234"}
"""


@pytest.fixture(autouse=True)
def restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--path`` edits sys.path in-process; each test gets its own copy back."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "terminal.db")


@pytest.fixture
def saga_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "quick_payment.yaml"
    path.write_text(SAGA_YAML, encoding="utf-8")
    return path


@pytest.fixture
def wait_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "pin_entry.yaml"
    path.write_text(WAIT_YAML, encoding="utf-8")
    return path


@pytest.fixture
def steps_dir(tmp_path: Path):
    """A directory holding a step module that is importable only through ``--path``."""
    folder = tmp_path / "steps"
    folder.mkdir()
    (folder / f"{STEPS_MODULE}.py").write_text(STEPS_SOURCE, encoding="utf-8")
    yield folder
    sys.modules.pop(STEPS_MODULE, None)


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def start_payment(capsys, db: str, payload: str = GOOD_INPUT) -> str:
    code, run = run_json(capsys, "run", str(PAYMENT), "--db", db, "--input", payload)
    assert code == 0, run
    return run["run_id"]


def section(text: str, start: str, end: str | None) -> str:
    tail = text.split(f"\n{start}\n", 1)[1]
    return tail.split(f"\n{end}\n", 1)[0] if end else tail


# --- validate and graph ------------------------------------------------------------------


def test_validate__a_valid_file_exits_0_and_names_its_workflow(capsys):
    assert main(["validate", str(PAYMENT)]) == 0
    out = capsys.readouterr().out
    assert f"ok   {PAYMENT}  (demo_payment v1)" in out
    assert "0 problem(s) in 1 file(s)" in out


BAD_YAML = """\
workflow_type: broken
version: 1
steps:
  - name: a
    type: STANDARD
    function: edge.examples.steps:validate
    next: nowhere
  - name: b
    type: STANDARD
    functon: edge.examples.steps:validate
"""


def test_validate__a_bad_file_exits_4_and_prints_every_problem_with_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML, encoding="utf-8")
    assert main(["validate", str(PAYMENT), str(bad)]) == 4
    out = capsys.readouterr().out
    assert f"ok   {PAYMENT}" in out
    assert f"FAIL {bad}" in out
    assert f"{bad}:7, step 'a', field 'next': unknown step 'nowhere'" in out
    assert f"{bad}:8, step 'b', field 'function': required field is missing" in out
    assert f"{bad}:10, step 'b', field 'functon': unknown field 'functon'" in out
    assert "3 problem(s) in 2 file(s)" in out


def test_validate__a_directory_checks_every_yaml_file_in_it(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_YAML, encoding="utf-8")
    (tmp_path / "good.yml").write_text(SAGA_YAML, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not yaml: [", encoding="utf-8")
    assert main(["validate", str(tmp_path)]) == 4
    assert "3 problem(s) in 2 file(s)" in capsys.readouterr().out


def test_validate__json_output_parses_and_locates_each_problem(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML, encoding="utf-8")
    assert main(["validate", str(PAYMENT), str(bad), "--json"]) == 4
    results = json.loads(capsys.readouterr().out)
    assert results[0] == {
        "file": str(PAYMENT),
        "ok": True,
        "workflow_type": "demo_payment",
        "version": "1",
    }
    assert results[1]["file"] == str(bad)
    assert results[1]["ok"] is False
    located = {(p["file"], p["line"], p["step"], p["field"]) for p in results[1]["problems"]}
    assert located == {
        (str(bad), 7, "a", "next"),
        (str(bad), 8, "b", "function"),
        (str(bad), 10, "b", "functon"),
    }


def test_graph__prints_a_mermaid_flowchart_with_every_step(capsys):
    assert main(["graph", str(PAYMENT)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flowchart TD")
    for step in ("validate", "check_amount", "reserve_funds", "charge_card", "record_sale"):
        assert step in out


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "{missing}"],
        ["graph", "{missing}"],
        ["run", "{missing}", "--db", "{db}"],
    ],
    ids=["validate", "graph", "run"],
)
def test_cli__a_missing_workflow_file_exits_1_naming_it(capsys, tmp_path, db, argv):
    missing = str(tmp_path / "nope.yaml")
    assert main([a.format(missing=missing, db=db) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert missing in err


# --- run -----------------------------------------------------------------------------------


def test_run__payment_completes_and_exits_0(capsys, db):
    code = main(["run", str(PAYMENT), "--db", db, "--input", GOOD_INPUT])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("run ")
    assert "demo_payment  COMPLETED" in out


def test_run__json_output_carries_the_final_state(capsys, db):
    code, run = run_json(capsys, "run", str(PAYMENT), "--db", db, "--input", GOOD_INPUT)
    assert code == 0
    assert run["status"] == "COMPLETED"
    assert run["state"]["receipt"] == "12.50 EUR approved"
    assert run["state"]["outcome"] == "approved"


def test_run__jammed_printer_rolls_back_and_exits_3(capsys, db, saga_yaml):
    payload = '{"amount": 1250, "currency": "EUR", "printer": "jammed"}'
    code = main(["run", str(saga_yaml), "--db", db, "--input", payload])
    out = capsys.readouterr().out
    assert code == 3
    assert "quick_payment  ROLLED_BACK  (print_receipt: printer jammed)" in out


def test_run__jammed_printer_compensates_the_reservation(capsys, db, saga_yaml):
    payload = '{"amount": 1250, "currency": "EUR", "printer": "jammed"}'
    code, run = run_json(capsys, "run", str(saga_yaml), "--db", db, "--input", payload)
    assert code == 3
    assert run["status"] == "ROLLED_BACK"
    assert run["state"]["reservation"] is None  # release_funds ran


def test_run__same_idempotency_key_twice_gives_the_same_run(capsys, db):
    argv = ["run", str(PAYMENT), "--db", db, "--input", GOOD_INPUT, "--idempotency-key", "pos-7"]
    first_code, first = run_json(capsys, *argv)
    second_code, second = run_json(capsys, *argv)
    assert (first_code, second_code) == (0, 0)
    assert first["run_id"] == second["run_id"]
    assert second["idempotency_key"] == "pos-7"
    assert main(["list", "--db", db]) == 0
    assert capsys.readouterr().out.count("demo_payment") == 1


def test_run__another_idempotency_key_gives_another_run(capsys, db):
    base = ["run", str(PAYMENT), "--db", db, "--input", GOOD_INPUT, "--idempotency-key"]
    _, first = run_json(capsys, *base, "pos-1")
    _, second = run_json(capsys, *base, "pos-2")
    assert first["run_id"] != second["run_id"]


def test_run__input_from_a_file_with_at(capsys, db, tmp_path):
    payload = tmp_path / "input.json"
    payload.write_text(GOOD_INPUT, encoding="utf-8")
    code, run = run_json(capsys, "run", str(PAYMENT), "--db", db, "--input", f"@{payload}")
    assert code == 0
    assert run["input"] == {"amount": 1250, "currency": "EUR"}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param("{amount: 1}", "error: --input is not valid JSON", id="not-json"),
        pytest.param("[1, 2]", "error: --input must be a JSON object, got list", id="not-object"),
    ],
)
def test_run__bad_input_exits_1_naming_input(capsys, db, payload, message):
    assert main(["run", str(PAYMENT), "--db", db, "--input", payload]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1


def test_run__a_directory_of_several_workflows_needs_workflow(capsys, db, tmp_path, saga_yaml):
    (tmp_path / "payment.yaml").write_text(PAYMENT.read_text(), encoding="utf-8")
    assert main(["run", str(tmp_path), "--db", db, "--input", GOOD_INPUT]) == 1
    err = capsys.readouterr().err
    assert "several workflows (demo_payment, quick_payment); choose one with --workflow" in err
    argv = ["run", str(tmp_path), "--db", db, "--input", GOOD_INPUT, "--workflow"]
    assert main([*argv, "quick_payment"]) == 0
    assert "quick_payment  COMPLETED" in capsys.readouterr().out


# --- WAIT and resume ------------------------------------------------------------------------


def test_run__wait_step_prints_waiting_with_the_resume_hint(capsys, db, wait_yaml):
    code = main(["run", str(wait_yaml), "--db", db, "--input", '{"currency": "EUR"}'])
    out = capsys.readouterr().out.strip()
    run_id = out.split()[1]
    assert code == 0
    assert out == (
        f"run {run_id}  pin_entry  WAITING  (waiting at await_pin; answer with: "
        f"tillflow resume {run_id} --input JSON)"
    )


def test_resume__answers_the_wait_and_completes_the_run(capsys, db, wait_yaml):
    argv = ["run", str(wait_yaml), "--db", db, "--input", '{"currency": "EUR"}']
    _, waiting = run_json(capsys, *argv)
    assert waiting["status"] == "WAITING"
    run_id = waiting["run_id"]
    assert main(["resume", run_id, "--db", db, "--input", '{"pin": "1234"}']) == 0
    assert capsys.readouterr().out == f"run {run_id}  pin_entry  COMPLETED\n"
    _, view = run_json(capsys, "show", run_id, "--db", db)
    assert view["run"]["state"] == {"currency": "EUR", "pin": "1234", "validated": True}
    assert [(s["step"], s["kind"]) for s in view["steps"]] == [
        ("await_pin", "input"),
        ("validate", "step"),
    ]


def test_resume__input_the_next_step_rejects_fails_the_run_with_exit_3(capsys, db, wait_yaml):
    _, waiting = run_json(capsys, "run", str(wait_yaml), "--db", db)
    code = main(["resume", waiting["run_id"], "--db", db, "--input", '{"currency": "XXX"}'])
    assert code == 3
    assert "FAILED  (validate: unsupported currency 'XXX')" in capsys.readouterr().out


def test_resume__a_second_resume_of_the_same_wait_exits_1(capsys, db, wait_yaml):
    _, waiting = run_json(
        capsys, "run", str(wait_yaml), "--db", db, "--input", '{"currency": "EUR"}'
    )
    run_id = waiting["run_id"]
    assert main(["resume", run_id, "--db", db, "--input", "{}"]) == 0
    capsys.readouterr()
    assert main(["resume", run_id, "--db", db, "--input", "{}"]) == 1
    assert capsys.readouterr().err == f"error: run {run_id} is COMPLETED, not waiting for input\n"


@pytest.mark.parametrize("path_first", [False, True], ids=["path-after", "path-before"])
def test_run__path_option_makes_a_step_module_importable(
    capsys, db, tmp_path, steps_dir, path_first
):
    workflow = tmp_path / "pin_check.yaml"
    workflow.write_text(
        f"workflow_type: pin_check\nversion: 1\nsteps:\n  - name: check\n"
        f"    type: STANDARD\n    function: {STEPS_MODULE}:check_pin\n",
        encoding="utf-8",
    )
    search = ["--path", str(steps_dir)]
    rest = ["--db", db, "--input", '{"pin": "1234"}']
    argv = ["run", *search, str(workflow)] if path_first else ["run", str(workflow), *search]
    code, run = run_json(capsys, *argv, *rest)
    assert code == 0
    assert run["state"]["pin_ok"] is True


def test_validate__path_option_makes_a_step_module_importable(capsys, tmp_path, steps_dir):
    workflow = tmp_path / "pin_check.yaml"
    workflow.write_text(
        f"workflow_type: pin_check\nversion: 1\nsteps:\n  - name: check\n"
        f"    type: STANDARD\n    function: {STEPS_MODULE}:check_pin\n",
        encoding="utf-8",
    )
    assert main(["validate", str(workflow)]) == 4
    assert f"cannot import module '{STEPS_MODULE}'" in capsys.readouterr().out
    assert main(["validate", str(workflow), "--path", str(steps_dir)]) == 0


@pytest.mark.parametrize("command", ["graph", "run"])
def test_cli__the_workflow_path_argument_is_not_added_to_sys_path(capsys, db, command):
    before = list(sys.path)
    extra = ["--db", db, "--input", GOOD_INPUT] if command == "run" else []
    assert main([command, str(PAYMENT), *extra]) == 0
    assert sys.path == before


def test_resume__a_run_that_is_not_waiting_exits_1_with_one_line(capsys, db):
    run_id = start_payment(capsys, db)
    assert main(["resume", run_id, "--db", db, "--input", "{}"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: run {run_id} is COMPLETED, not waiting for input\n"


def test_resume__an_unknown_run_exits_1_with_one_line(capsys, db):
    assert main(["resume", "no-such-run", "--db", db]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no run no-such-run")
    assert err.count("\n") == 1


# --- show, list, cancel ---------------------------------------------------------------------


def test_show__lists_the_steps_and_the_audit_trail(capsys, db):
    run_id = start_payment(capsys, db)
    assert main(["show", run_id, "--db", db]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run_id}  demo_payment  COMPLETED")
    steps = section(out, "steps:", "audit:")
    audit = section(out, "audit:", None)
    executed = ["validate", "reserve_funds", "charge_card", "print_receipt", "record_sale"]
    for name in executed:
        assert name in steps
    assert "reject" not in steps
    assert steps.index("reserve_funds") < steps.index("charge_card") < steps.index("record_sale")
    assert "run_started" in audit
    assert "run_completed" in audit


def test_show__json_has_the_run_its_steps_and_its_audit(capsys, db):
    run_id = start_payment(capsys, db)
    code, view = run_json(capsys, "show", run_id, "--db", db)
    assert code == 0
    assert view["run"]["run_id"] == run_id
    assert [s["step"] for s in view["steps"] if s["kind"] == "step"] == [
        "validate",
        "reserve_funds",
        "charge_card",
        "print_receipt",
        "record_sale",
    ]
    assert view["audit"][0]["event"] == "run_started"
    assert view["audit"][-1]["event"] == "run_completed"
    assert {a["run_id"] for a in view["audit"]} == {run_id}


def test_list__status_filter_shows_only_runs_with_that_status(capsys, db, saga_yaml):
    completed = start_payment(capsys, db)
    payload = '{"amount": 1, "currency": "EUR", "printer": "jammed"}'
    _, rolled_back = run_json(capsys, "run", str(saga_yaml), "--db", db, "--input", payload)
    assert main(["list", "--db", db, "--status", "COMPLETED"]) == 0
    out = capsys.readouterr().out
    assert completed in out
    assert rolled_back["run_id"] not in out
    code, runs = run_json(capsys, "list", "--db", db, "--status", "ROLLED_BACK")
    assert code == 0
    assert [r["run_id"] for r in runs] == [rolled_back["run_id"]]


def test_list__an_empty_database_says_no_runs(capsys, db):
    assert main(["list", "--db", db]) == 0
    assert capsys.readouterr().out == "no runs\n"


def test_cancel__a_finished_run_exits_1(capsys, db):
    run_id = start_payment(capsys, db)
    assert main(["cancel", run_id, "--db", db]) == 1
    assert capsys.readouterr().err == f"error: run {run_id} is already COMPLETED\n"


def test_cancel__a_waiting_run_ends_cancelled(capsys, db, wait_yaml):
    _, waiting = run_json(capsys, "run", str(wait_yaml), "--db", db)
    assert main(["cancel", waiting["run_id"], "--db", db, "--reason", "customer left"]) == 0
    assert "pin_entry  CANCELLED  (-: customer left)" in capsys.readouterr().out


# --- audit ----------------------------------------------------------------------------------


def test_audit_verify__an_untouched_chain_exits_0_and_says_ok(capsys, db):
    start_payment(capsys, db)
    assert main(["audit", "verify", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit chain ok: ")
    assert int(out.split()[3]) > 0  # "audit chain ok: N rows verified"


def test_audit_verify__an_edited_row_exits_4_and_names_its_seq(capsys, db):
    start_payment(capsys, db)
    conn = apsw.Connection(db)
    try:
        conn.execute("DROP TRIGGER workflow_audit_log_no_update")
        conn.execute("UPDATE workflow_audit_log SET detail = '{\"amount\":1}' WHERE seq = 3")
        assert conn.changes() == 1
    finally:
        conn.close()
    assert main(["audit", "verify", "--db", db]) == 4
    out = capsys.readouterr().out
    assert (
        out.strip() == "audit chain BROKEN at seq 3: row content does not match its hash (edited)"
    )
    code, report = run_json(capsys, "audit", "verify", "--db", db)
    assert code == 4
    assert (report["ok"], report["broken_at"]) == (False, 3)


# --- db ---------------------------------------------------------------------------------------


def test_db__status_of_a_fresh_database_is_0_and_creates_no_tables(capsys, db):
    assert main(["db", "status", "--db", db]) == 0
    assert capsys.readouterr().out == f"{db}: schema version 0\n"
    conn = apsw.Connection(db)
    try:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchall() == [(0,)]
    finally:
        conn.close()


def test_db__migrate_brings_a_fresh_database_to_the_latest_version(capsys, db):
    latest = len(load_migrations("sqlite"))
    assert main(["db", "migrate", "--db", db]) == 0
    assert capsys.readouterr().out == f"{db}: schema version {latest}\n"
    code, status = run_json(capsys, "db", "status", "--db", db)
    assert code == 0
    assert status == {"db": db, "schema_version": latest}


# --- help -------------------------------------------------------------------------------------


def test_help__exits_0_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tillflow")
    commands = ["validate", "graph", "run", "resume", "show", "list", "recover", "cancel"]
    for command in [*commands, "audit", "db"]:
        assert f"\n    {command} " in out


def test_usage__an_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_recover__with_nothing_in_flight_recovers_nothing(capsys, db):
    start_payment(capsys, db)
    assert main(["recover", "--db", db]) == 0
    assert capsys.readouterr().out == "recovered 0 run(s)\n"


def test_cli__a_libpq_connection_string_is_refused_not_taken_for_a_file(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code = main(["db", "status", "--database-url", "host=127.0.0.1 dbname=test"])
    assert code == 1
    assert "libpq connection string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no file named like the string was created
