"""Load workflow YAML into a ``Workflow``: validated, imports resolved, every problem located.

Validation runs in two passes over the same document and reports everything at once:
pydantic checks shapes and types; ``_Checker`` checks what a schema cannot (duplicate
names, jump targets, importable functions, safe expressions, templates). Each Problem
names the file, line, step and field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from edge.engine.definition import (
    END,
    STEP_MODELS,
    STEP_TYPES,
    AnyStep,
    LoopStep,
    RetryPolicy,
    Route,
    Task,
    WorkflowDefinition,
)
from edge.engine.expressions import check_expression
from edge.engine.imports import ImportPathError, fingerprint, resolve
from edge.engine.templating import check_template
from edge.errors import DefinitionError, Problem

Path_ = tuple[str | int, ...]


@dataclass
class Workflow:
    """A validated definition with its code resolved: what the engine executes."""

    definition: WorkflowDefinition
    source: str
    content_hash: str
    snapshot: str
    functions: dict[str, Callable[..., Any]]
    models: dict[str, type[BaseModel]]
    fingerprints: dict[str, str]
    steps: dict[str, AnyStep] = field(default_factory=dict)
    parent: dict[str, str | None] = field(default_factory=dict)
    sequences: dict[str | None, list[str]] = field(default_factory=dict)

    @property
    def workflow_type(self) -> str:
        return self.definition.workflow_type

    @property
    def version(self) -> str:
        return str(self.definition.version)

    @property
    def state_model(self) -> type[BaseModel] | None:
        path = self.definition.state_model
        return self.models[path] if path else None

    def first(self, loop: str | None = None) -> str:
        return self.sequences[loop][0]

    def following(self, name: str) -> str:
        """The step after ``name`` in its sequence: its ``next``, else the next listed, else END."""
        step = self.steps[name]
        if step.next:
            return step.next
        seq = self.sequences[self.parent[name]]
        i = seq.index(name)
        return seq[i + 1] if i + 1 < len(seq) else END


def load_file(path: str | Path) -> Workflow:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError([Problem(str(p), None, None, None, f"cannot read: {exc}")]) from exc
    return load_text(text, source=str(p))


def load_text(text: str, source: str = "<string>") -> Workflow:
    data, lines, problems = _parse_yaml(text, source)
    if data is None:
        raise DefinitionError(problems)
    if not isinstance(data, dict):
        problems.append(Problem(source, 1, None, None, "a workflow must be a YAML mapping"))
        raise DefinitionError(problems)
    definition: WorkflowDefinition | None = None
    try:
        definition = WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from_pydantic(exc, data, lines, source))
    checker = _Checker(source, lines)
    checker.check(data)
    problems.extend(checker.problems)
    if problems or definition is None:
        raise DefinitionError(_dedupe(problems))
    return _build(definition, source, checker)


def load_snapshot(snapshot: str, source: str = "<snapshot>") -> Workflow:
    """Rebuild a pinned definition from the JSON snapshot stored with its runs."""
    return load_text(snapshot, source=source)  # JSON is YAML: one code path, same checks


def _close_matches(word: str, possibilities: list[str]) -> list[str]:
    """The nearest name, for a 'did you mean' hint: difflib comes with the first typo."""
    import difflib

    return difflib.get_close_matches(word, possibilities, n=1)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _build(definition: WorkflowDefinition, source: str, checker: _Checker) -> Workflow:
    snapshot = canonical_json(definition.model_dump(mode="json", by_alias=True, exclude_none=True))
    wf = Workflow(
        definition=definition,
        source=source,
        content_hash=hashlib.sha256(snapshot.encode()).hexdigest(),
        snapshot=snapshot,
        functions=checker.functions,
        models=checker.models,
        fingerprints={p: fingerprint(f) for p, f in checker.functions.items()},
    )

    def index(steps: list[AnyStep], loop: str | None) -> None:
        wf.sequences[loop] = [s.name for s in steps]
        for s in steps:
            wf.steps[s.name] = s
            wf.parent[s.name] = loop
            if isinstance(s, LoopStep):
                index(s.body, s.name)

    index(list(definition.steps), None)
    return wf


# --- YAML with line numbers ---------------------------------------------------------


#: libyaml's parser when PyYAML has it: ~20x the pure-Python one, and a terminal parses
#: its workflows at every start (~10 ms of its CPU to READY). It builds the same nodes
#: (the resolver is Python's in both); a document it refuses is parsed again by the
#: pure-Python parser, whose messages quote the line and name what is wrong.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        return yaml.compose(text, Loader=yaml.SafeLoader)  # its error, or (never) its node


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Path_, int], list[Problem]]:
    lines: dict[Path_, int] = {}
    problems: list[Problem] = []
    try:
        node = _compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problems.append(Problem(source, line, None, None, f"not valid YAML: {exc}"))
        return None, lines, problems
    if node is None:
        problems.append(Problem(source, 1, None, None, "the file is empty"))
        return None, lines, problems
    constructor = yaml.SafeLoader("")
    duplicates: list[tuple[Path_, int]] = []

    def convert(n: yaml.Node, path: Path_) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                if key in out:
                    duplicates.append(((*path, key), k.start_mark.line + 1))
                lines[(*path, key)] = k.start_mark.line + 1
                out[key] = convert(v, (*path, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(v, (*path, i)) for i, v in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    data = convert(node, ())
    for dup_path, line in duplicates:
        step = _step_at(data, dup_path)
        problems.append(Problem(source, line, step, str(dup_path[-1]), "key appears twice"))
    return data, lines, problems


def _step_at(data: Any, path: Path_) -> str | None:
    """Name of the innermost step that ``path`` points into."""
    name = None
    cur = data
    for i, key in enumerate(path):
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            break
        in_steps = isinstance(key, int) and i > 0 and path[i - 1] in ("steps", "body")
        if in_steps and isinstance(cur, dict) and isinstance(cur.get("name"), str):
            name = cur["name"]
    return name


def _line_at(lines: dict[Path_, int], path: Path_) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _problems_from_pydantic(
    exc: ValidationError, data: Any, lines: dict[Path_, int], source: str
) -> Iterator[Problem]:
    for err in exc.errors():
        # Drop the discriminator tags pydantic inserts ('steps', 0, 'STANDARD', ...).
        path: Path_ = tuple(
            p
            for i, p in enumerate(err["loc"])
            if not (
                isinstance(p, str)
                and p in STEP_TYPES
                and i > 0
                and isinstance(err["loc"][i - 1], int)
            )
        )
        field_name = next((p for p in reversed(path) if isinstance(p, str)), None)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = f"unknown field '{field_name}'"
            allowed = _allowed_fields(data, path)
            close = _close_matches(str(field_name), allowed)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            field_name = "type"
            path = (*path, "type")  # point at the 'type:' line itself when there is one
            msg = f"step type must be one of {', '.join(STEP_TYPES)}"
        else:
            msg = err["msg"]
        yield Problem(source, _line_at(lines, path), _step_at(data, path), field_name, msg)


def _allowed_fields(data: Any, path: Path_) -> list[str]:
    """The field names valid in the mapping that holds ``path``'s last key (for hints)."""
    cur: Any = data
    for key in path[:-1]:
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            return []
    parent = path[-2] if len(path) >= 2 else None
    container = path[-3] if len(path) >= 3 else None
    model: Any
    if len(path) == 1:
        model = WorkflowDefinition
    elif parent == "retry":
        model = RetryPolicy
    elif container == "routes":
        model = Route
    elif container == "tasks":
        model = Task
    elif container in ("steps", "body") and isinstance(cur, dict):
        model = STEP_MODELS.get(str(cur.get("type")))
        if model is None:  # unknown type: any step field may be meant
            return sorted(
                {f.alias or n for m in STEP_MODELS.values() for n, f in m.model_fields.items()}
            )
    else:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# --- checks a schema cannot express --------------------------------------------------


class _Checker:
    """Semantic checks over the raw document, tolerant of shapes pydantic will reject."""

    def __init__(self, source: str, lines: dict[Path_, int]) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[Problem] = []
        self.functions: dict[str, Callable[..., Any]] = {}
        self.models: dict[str, type[BaseModel]] = {}
        self._names: dict[str, Path_] = {}

    def problem(self, path: Path_, step: str | None, fld: str | None, msg: str) -> None:
        self.problems.append(Problem(self.source, _line_at(self.lines, path), step, fld, msg))

    def check(self, data: dict[str, Any]) -> None:
        model = data.get("state_model")
        if isinstance(model, str):
            self._model(model, ("state_model",), None, "state_model")
        steps = data.get("steps")
        if isinstance(steps, list):
            self._sequence(steps, ("steps",))

    def _sequence(self, steps: list[Any], path: Path_) -> None:
        names = {s.get("name") for s in steps if isinstance(s, dict)}
        for i, raw in enumerate(steps):
            if not isinstance(raw, dict):
                continue
            spath = (*path, i)
            name = raw.get("name") if isinstance(raw.get("name"), str) else None
            if name is not None:
                if name in self._names:
                    first = _line_at(self.lines, self._names[name])
                    self.problem(
                        (*spath, "name"),
                        name,
                        "name",
                        f"duplicate step name (first at line {first})",
                    )
                else:
                    self._names[name] = (*spath, "name")
                if name == END:
                    self.problem((*spath, "name"), name, "name", f"'{END}' is reserved")
            self._step(raw, spath, name, names)

    def _target(
        self, target: Any, path: Path_, step: str | None, fld: str, names: set[Any]
    ) -> None:
        if isinstance(target, str) and target != END and target not in names:
            hint = _close_matches(target, [n for n in names if isinstance(n, str)])
            msg = f"unknown step '{target}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
            msg += " (targets must be in the same sequence, or END)"
            self.problem(path, step, fld, msg)

    def _step(self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]) -> None:
        kind = raw.get("type")
        self._target(raw.get("next"), (*path, "next"), name, "next", names)
        for fld in ("function", "compensate"):
            if isinstance(raw.get(fld), str):
                self._function(raw[fld], (*path, fld), name, fld)
        # A missing or unknown type is already one problem (pydantic's); the fields the
        # step does have are checked as every type would check them, so that fixing the
        # type reveals nothing new. Each check looks only at fields that are present.
        checks = _CHECKS_BY_TYPE.get(kind) if isinstance(kind, str) else None
        for check in _EVERY_CHECK if checks is None else checks:
            check(self, raw, path, name, names)

    def _decision(
        self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]
    ) -> None:
        routes = raw.get("routes")
        for j, route in enumerate(routes if isinstance(routes, list) else []):
            if not isinstance(route, dict):
                continue
            rpath = (*path, "routes", j)
            self._expression(route.get("when"), (*rpath, "when"), name, f"routes[{j}].when")
            self._target(route.get("next"), (*rpath, "next"), name, f"routes[{j}].next", names)
        self._target(raw.get("default"), (*path, "default"), name, "default", names)

    def _parallel(
        self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]
    ) -> None:
        tasks = raw.get("tasks")
        seen: set[str] = set()
        for j, task in enumerate(tasks if isinstance(tasks, list) else []):
            if not isinstance(task, dict):
                continue
            if task.get("name") in seen:
                self.problem(
                    (*path, "tasks", j, "name"), name, f"tasks[{j}].name", "duplicate task name"
                )
            seen.add(str(task.get("name")))
            if isinstance(task.get("function"), str):
                self._function(
                    task["function"], (*path, "tasks", j, "function"), name, f"tasks[{j}].function"
                )

    def _http(self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]) -> None:
        for fld in ("url", "headers", "body"):
            for msg in check_template(raw.get(fld)):
                self.problem((*path, fld), name, fld, msg)

    def _wait(self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]) -> None:
        if isinstance(raw.get("input_schema"), str):
            self._model(raw["input_schema"], (*path, "input_schema"), name, "input_schema")
        if raw.get("on_timeout") is not None:
            self._target(raw["on_timeout"], (*path, "on_timeout"), name, "on_timeout", names)
            if raw.get("timeout_s") is None:
                self.problem((*path, "on_timeout"), name, "on_timeout", "needs timeout_s")

    def _sub_workflow(
        self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]
    ) -> None:
        for msg in check_template(raw.get("input")):
            self.problem((*path, "input"), name, "input", msg)

    def _loop(self, raw: dict[str, Any], path: Path_, name: str | None, names: set[Any]) -> None:
        mode = raw.get("mode")
        if mode == "ITERATE":
            if raw.get("over") is None:
                self.problem(
                    (*path, "mode"), name, "over", "ITERATE needs 'over' (e.g. state.items)"
                )
            if raw.get("while") is not None:
                self.problem((*path, "while"), name, "while", "'while' is for mode WHILE")
            self._expression(raw.get("over"), (*path, "over"), name, "over")
        elif mode == "WHILE":
            if raw.get("while") is None:
                self.problem((*path, "mode"), name, "while", "WHILE needs a 'while' expression")
            if raw.get("over") is not None:
                self.problem((*path, "over"), name, "over", "'over' is for mode ITERATE")
            self._expression(raw.get("while"), (*path, "while"), name, "while")
        body = raw.get("body")
        if isinstance(body, list):
            self._sequence(body, (*path, "body"))

    def _expression(self, source: Any, path: Path_, step: str | None, fld: str) -> None:
        if isinstance(source, str):
            err = check_expression(source)
            if err:
                self.problem(path, step, fld, err)

    def _function(self, ipath: str, path: Path_, step: str | None, fld: str) -> None:
        try:
            obj = resolve(ipath)
        except ImportPathError as exc:
            self.problem(path, step, fld, str(exc))
            return
        if not callable(obj) or isinstance(obj, type):
            self.problem(path, step, fld, f"'{ipath}' is not a function")
            return
        self.functions[ipath] = obj

    def _model(self, ipath: str, path: Path_, step: str | None, fld: str) -> None:
        try:
            obj = resolve(ipath)
        except ImportPathError as exc:
            self.problem(path, step, fld, str(exc))
            return
        if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
            self.problem(path, step, fld, f"'{ipath}' is not a pydantic model class")
            return
        self.models[ipath] = obj


_Check = Callable[[_Checker, dict[str, Any], Path_, str | None, set[Any]], None]
# The checks of each step type beyond those every step gets (next, function, compensate).
_CHECKS_BY_TYPE: dict[str, tuple[_Check, ...]] = {
    "STANDARD": (),
    "DECISION": (_Checker._decision,),
    "LOOP": (_Checker._loop,),
    "PARALLEL": (_Checker._parallel,),
    "HTTP": (_Checker._http,),
    "WAIT": (_Checker._wait,),
    "SUB_WORKFLOW": (_Checker._sub_workflow,),
    "FIRE_AND_FORGET": (_Checker._sub_workflow,),
}
_EVERY_CHECK = tuple(dict.fromkeys(c for cs in _CHECKS_BY_TYPE.values() for c in cs))


__all__ = ["Workflow", "canonical_json", "load_file", "load_snapshot", "load_text"]
