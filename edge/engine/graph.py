"""Render a loaded workflow as a Mermaid ``flowchart TD`` diagram, for docs and review.

Pure text in, text out: the same ``Workflow`` always gives the same diagram. Step names
become node ids (sanitised, never a Mermaid keyword, unique); every label is quoted and
escaped, so no expression or import path can break the diagram's syntax.
"""

from __future__ import annotations

import re

from edge.engine.definition import (
    END,
    AnyStep,
    DecisionStep,
    HttpStep,
    LoopStep,
    ParallelStep,
    StandardStep,
    SubWorkflowStep,
    WaitStep,
)
from edge.engine.imports import split_path
from edge.engine.loader import Workflow

_START = "wf_start"
_STOP = "wf_end"
_INDENT = "    "
# Words the flowchart grammar reads as statements; a node with one of these ids breaks parsing.
_KEYWORDS = frozenset(
    {"end", "graph", "flowchart", "subgraph", "direction", "style", "linkstyle", "classdef"}
    | {"class", "click", "call", "href", "default", "interpolate", "acctitle", "accdescr"}
)
# Mermaid entity codes; '#' first, so the codes written for the others stay intact.
_ESCAPES = (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("`", "#96;"))

_Key = tuple[str, str]  # ("step" | "body" | "comp", step name)


def to_mermaid(wf: Workflow) -> str:
    """The workflow as Mermaid flowchart text (newline-terminated)."""
    ids = _node_ids(wf)
    lines = ["flowchart TD", f'{_INDENT}{_START}(("start"))', f'{_INDENT}{_STOP}(("end"))']
    _declare(wf, wf.sequences[None], ids, lines, 1)
    lines.append(f"{_INDENT}{_START} --> {ids['step', wf.first(None)]}")
    for name in wf.steps:
        lines.extend(f"{_INDENT}{edge}" for edge in _edges(wf, name, ids))
    return "\n".join(lines) + "\n"


def _node_ids(wf: Workflow) -> dict[_Key, str]:
    """Safe, unique ids, given in definition order so they are stable across calls."""
    taken = {_START, _STOP}
    ids: dict[_Key, str] = {}

    def claim(key: _Key, wanted: str) -> None:
        base = re.sub(r"[^A-Za-z0-9_]", "_", wanted)
        candidate, n = base, 1
        while candidate in taken or candidate.lower() in _KEYWORDS:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        ids[key] = candidate

    for name in wf.steps:
        claim(("step", name), name)
    for name, step in wf.steps.items():
        if isinstance(step, LoopStep):
            claim(("body", name), f"{ids['step', name]}_body")
        if _compensation(step):
            claim(("comp", name), f"comp_{ids['step', name]}")
    return ids


def _declare(
    wf: Workflow, names: list[str], ids: dict[_Key, str], lines: list[str], depth: int
) -> None:
    pad = _INDENT * depth
    for name in names:
        step = wf.steps[name]
        lines.append(pad + ids["step", name] + _shape(step))
        undo = _compensation(step)
        if undo:
            lines.append(f'{pad}{ids["comp", name]}["{_escape("undo: " + undo)}"]')
        if isinstance(step, LoopStep):
            lines.append(f'{pad}subgraph {ids["body", name]} ["{_escape(name)} body"]')
            _declare(wf, wf.sequences[name], ids, lines, depth + 1)
            lines.append(pad + "end")


def _shape(step: AnyStep) -> str:
    name = _escape(step.name)
    if isinstance(step, StandardStep):
        return f'["{name}"]'
    if isinstance(step, DecisionStep):
        return f'{{"{name}"}}'
    if isinstance(step, LoopStep):
        source = step.over if step.mode == "ITERATE" else step.while_
        word = "over" if step.mode == "ITERATE" else "while"
        return f'{{{{"{name}<br/>LOOP {word} {_escape(source or "")}"}}}}'
    if isinstance(step, ParallelStep):
        tasks = ", ".join(_escape(task.name) for task in step.tasks)
        return f'[/"{name}<br/>PARALLEL: {tasks}"/]'
    if isinstance(step, HttpStep):
        return f'["{name}<br/>HTTP {step.method}"]'
    if isinstance(step, WaitStep):
        return f'(["{name}<br/>WAIT"])'
    if isinstance(step, SubWorkflowStep):
        return f'[["{name}<br/>SUB_WORKFLOW: {_escape(step.workflow)}"]]'
    return f'>"{name}<br/>FIRE_AND_FORGET: {_escape(step.workflow)}"]'


def _edges(wf: Workflow, name: str, ids: dict[_Key, str]) -> list[str]:
    step = wf.steps[name]
    loop = wf.parent[name]
    src = ids["step", name]

    def to(target: str, label: str | None = None) -> str:
        if target == END and loop is not None:  # END inside a body ends one iteration
            dst = ids["step", loop]
            label = label or _iterate_label(wf.steps[loop])
        else:
            dst = _STOP if target == END else ids["step", target]
        return f"{src} --> {dst}" if label is None else f'{src} -->|"{_escape(label)}"| {dst}'

    if isinstance(step, DecisionStep):
        out = [to(route.next, route.when) for route in step.routes]
        return [*out, to(step.default, "default")]
    out = []
    if isinstance(step, LoopStep):
        out.append(f"{src} --> {ids['step', wf.first(name)]}")
        out.append(to(wf.following(name), "done"))
    else:
        out.append(to(wf.following(name)))
    if isinstance(step, WaitStep) and step.on_timeout:
        out.append(to(step.on_timeout, "timeout"))
    if _compensation(step):
        out.append(f"{src} -.-> {ids['comp', name]}")
    return out


def _iterate_label(loop: AnyStep) -> str:
    assert isinstance(loop, LoopStep)
    return "next item" if loop.mode == "ITERATE" else f"while {loop.while_}"


def _compensation(step: AnyStep) -> str | None:
    """The compensating function's short name, or None for steps that are never undone."""
    path = getattr(step, "compensate", None)
    return split_path(path)[1] if isinstance(path, str) else None


def _escape(text: str) -> str:
    text = " ".join(text.split())  # a raw newline ends a Mermaid statement
    for raw, code in _ESCAPES:
        text = text.replace(raw, code)
    return text


__all__ = ["to_mermaid"]
