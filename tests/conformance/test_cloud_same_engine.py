"""The control plane runs on the terminal's engine (DESIGN.md: "the control plane runs on
the same engine as the terminal"; issue 13, "Proof").

- a workflow written as the cloud's are (``cloud/workflows`` style YAML: a decision, a
  retried step, a saga that compensates) runs through ``cloud.engine.cloud_engine`` on
  the SQLite store and on PostgreSQL, and the two leave the same run behind: state,
  step history, audit events;
- the cloud's own workflows register alike on both;
- nothing in ``edge/engine`` imports, names or branches on the cloud or Celery (its
  docstrings may say where it is used; its code may not).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import tf_steps

from cloud.engine import WORKFLOWS, cloud_engine
from cloud.settings import CloudSettings
from edge.engine import Engine, FakeClock, InlineExecutor, Status, Store
from edge.store.sqlite import SqliteStore

ENGINE_DIR = Path(__file__).resolve().parents[2] / "edge" / "engine"

#: As a cloud workflow is written: a retried step, a decision, a saga.
ROLLOUT_YAML = """\
workflow_type: mini_rollout
version: "1"
saga: true
steps:
  - name: prepare
    type: STANDARD
    function: tf_steps:add
    compensate: tf_steps:undo
  - name: push
    type: STANDARD
    function: tf_steps:flaky
    retry: {max_attempts: 3, initial_backoff_s: 1, max_backoff_s: 2, jitter: 0}
  - name: route
    type: DECISION
    routes:
      - when: state.x > 100
        next: abort
    default: record
  - name: record
    type: STANDARD
    function: tf_steps:emit_sale
    next: END
  - name: abort
    type: STANDARD
    function: tf_steps:fatal
"""


def _settings(tmp_path: Path) -> CloudSettings:
    wf = tmp_path / "workflows"
    wf.mkdir(exist_ok=True)
    (wf / "mini_rollout.yaml").write_text(ROLLOUT_YAML, encoding="utf-8")
    return CloudSettings(workflow_dirs=[wf])


def _outcome(engine: Engine, run_id: str) -> dict[str, Any]:
    """What a run left behind, without ids and times (they differ by construction)."""
    view = engine.show(run_id)
    return {
        "status": view.run.status,
        "state": view.run.state,
        "error": (view.run.error or {}).get("code"),
        "steps": [(s.step, s.kind, s.status, s.attempt) for s in view.steps],
        "audit": [(a.event, a.step, a.detail) for a in view.audit],
    }


def _run_all(store: Store, settings: CloudSettings) -> list[dict[str, Any]]:
    tf_steps.reset()
    tf_steps.KNOBS["flaky"] = 1  # the push fails once, then succeeds
    engine = cloud_engine(store, InlineExecutor(), settings=settings, clock=FakeClock())
    try:
        ok = engine.start("mini_rollout", {"x": 5, "amount": 900})
        tf_steps.KNOBS["flaky"] = 1
        aborted = engine.start("mini_rollout", {"x": 500, "amount": 900})
        assert engine.get(ok).status is Status.COMPLETED
        assert engine.get(aborted).status is Status.ROLLED_BACK
        return [_outcome(engine, ok), _outcome(engine, aborted)]
    finally:
        engine.close()


def test_a_cloud_workflow__same_result_on_sqlite_and_postgresql(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from cloud.store.postgres import PostgresStore

    settings = _settings(tmp_path)
    lite = SqliteStore(str(tmp_path / "cloud-on-sqlite.db"))
    try:
        on_sqlite = _run_all(lite, settings)
    finally:
        lite.close()
    pg = PostgresStore(request.getfixturevalue("pg_url"), pool_size=2)
    try:
        on_postgres = _run_all(pg, settings)
    finally:
        pg.close()
    assert on_sqlite == on_postgres
    completed, aborted = on_sqlite
    assert ("push", "step", "RETRYING", 1) in completed["steps"]
    assert any(kind == "compensation" for _, kind, _, _ in aborted["steps"])


def test_the_cloud_workflows__register_alike_on_both_stores(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from cloud.store.postgres import PostgresStore

    settings = CloudSettings()
    hashes = []
    for store in (
        SqliteStore(str(tmp_path / "registry.db")),
        PostgresStore(request.getfixturevalue("pg_url"), pool_size=2),
    ):
        try:
            engine = cloud_engine(store, InlineExecutor(), settings=settings)
            hashes.append(
                {
                    wf.workflow_type: wf.content_hash
                    for wf in (engine.registry.latest(t) for t in _types(WORKFLOWS))
                }
            )
            engine.close()
        finally:
            store.close()
    assert hashes[0] == hashes[1]


def _types(directory: Path) -> list[str]:
    import yaml

    return [
        str(yaml.safe_load(p.read_text(encoding="utf-8"))["workflow_type"])
        for p in sorted(directory.glob("*.yaml"))
    ]


# --- no cloud-only branch in the engine --------------------------------------------------

FORBIDDEN = re.compile(r"celery|kombu|cloud|redis|psycopg", re.IGNORECASE)


def _code_words(tree: ast.AST) -> list[tuple[int, str]]:
    """Imported modules, names, attributes and string constants, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    words: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            words += [(line, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            words.append((line, node.module or ""))
        elif isinstance(node, ast.Name):
            words.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((line, node.attr))
        elif isinstance(node, ast.arg):
            words.append((line, node.arg))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.append((line, node.value))
    return words


def test_edge_engine__names_neither_the_cloud_nor_celery_in_its_code() -> None:
    modules = sorted(ENGINE_DIR.glob("*.py"))
    assert len(modules) > 10
    found = []
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.name}:{n}: {w!r}" for n, w in _code_words(tree) if FORBIDDEN.search(w)]
    assert found == []


def test_the_checker_finds_a_cloud_branch() -> None:
    planted = ast.parse('import celery\nif executor.kind == "cloud":\n    pass\n')
    hits = [w for _, w in _code_words(planted) if FORBIDDEN.search(w)]
    assert hits == ["celery", "cloud"]
