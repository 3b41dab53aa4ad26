"""Helpers for the workflow-definition tests: YAML fixtures, and where a problem is."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import edge.examples
from edge.engine.loader import Workflow, load_file
from edge.errors import DefinitionError, Problem

PAYMENT = Path(edge.examples.__file__).parent / "payment.yaml"
FN = "edge.examples.steps:validate"
HEAD = "workflow_type: t\nversion: 1\n"


def yaml_text(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle``."""
    hits = [i for i, ln in enumerate(text.splitlines(), start=1) if needle in ln]
    assert len(hits) >= nth, f"{needle!r} occurs {len(hits)} time(s) in the fixture"
    return hits[nth - 1]


def load_bad(tmp_path: Path, text: str) -> tuple[str, list[Problem]]:
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DefinitionError) as info:
        load_file(path)
    return str(path), info.value.problems


def the_problem(tmp_path: Path, text: str) -> tuple[str, Problem]:
    file, problems = load_bad(tmp_path, text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return file, problems[0]


def where(p: Problem) -> tuple[str, int | None, str | None, str | None]:
    return (p.file, p.line, p.step, p.field)


def load_ok(tmp_path: Path, text: str) -> Workflow:
    path = tmp_path / "ok.yaml"
    path.write_text(text, encoding="utf-8")
    return load_file(path)
