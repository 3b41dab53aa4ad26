"""Where a run stands, and the pure moves between action steps.

The cursor is a stack of frames ``[name, index]``: the top-level step, then for each
LOOP on the way down, the body step inside it (the loop frame holds its iteration).
DECISION routing and LOOP entry/iteration/exit have no side effects, so they are
settled eagerly and committed with the outcome of the step before them: they cost no
transaction of their own, and re-settling after a crash gives the same answer because
the run's definition is pinned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.engine.definition import END, DecisionStep, LoopStep
from edge.engine.expressions import Expression, compile_expression
from edge.engine.loader import Workflow
from edge.errors import ExpressionError, StepError

Frames = list[list[Any]]


def step_path(frames: Frames) -> str:
    parts = []
    for name, index in frames:
        parts.append(f"{name}[{index}]" if index is not None else str(name))
    return ".".join(parts)


@dataclass
class Decision:
    step: str
    path: str
    target: str
    detail: dict[str, Any]


@dataclass
class Settled:
    frames: Frames  # empty when the workflow has finished
    decisions: list[Decision] = field(default_factory=list)
    #: A routing step that could not decide (bad expression, loop limit): the run fails there.
    failure: tuple[str, str, StepError] | None = None


class Navigator:
    """Settles cursors for one workflow; compiled expressions are cached per workflow."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self._compiled: dict[str, Expression] = {}

    def expr(self, source: str) -> Expression:
        e = self._compiled.get(source)
        if e is None:
            e = self._compiled[source] = compile_expression(source)
        return e

    def start(self, state: dict[str, Any], run_input: Any) -> Settled:
        return self.settle([[self.wf.first(None), None]], state, run_input)

    def after(self, frames: Frames, state: dict[str, Any], run_input: Any) -> Settled:
        """Move past the action step on top of ``frames`` and settle."""
        top = frames[-1][0]
        return self.jump(frames, self.wf.following(top), state, run_input)

    def jump(self, frames: Frames, target: str, state: dict[str, Any], run_input: Any) -> Settled:
        moved = [list(f) for f in frames]
        moved[-1] = [target, None]
        return self.settle(moved, state, run_input)

    def loop_items(self, loop: LoopStep, state: dict[str, Any], run_input: Any) -> Any:
        assert loop.over is not None
        return self.expr(loop.over).evaluate(state, run_input)

    def item_at(
        self, frames: Frames, state: dict[str, Any], run_input: Any
    ) -> tuple[Any, int | None]:
        """(item, index) of the innermost loop around the top frame."""
        for name, index in reversed(frames[:-1]):
            loop = self.wf.steps[name]
            if isinstance(loop, LoopStep):
                if loop.mode == "ITERATE":
                    items = self.loop_items(loop, state, run_input)
                    return (
                        items[index] if isinstance(items, list) and index < len(items) else None
                    ), index
                return None, index
        return None, None

    def settle(self, frames: Frames, state: dict[str, Any], run_input: Any) -> Settled:
        out = Settled(frames=frames)
        guard = 0
        while frames:
            guard += 1
            if guard > 100_000:  # a DECISION cycle with no action step in it
                out.failure = (
                    frames[-1][0],
                    step_path(frames),
                    StepError("routing loops without progress", retryable=False),
                )
                return out
            name, index = frames[-1]
            if name == END:
                frames.pop()
                if not frames:
                    break
                loop = self.wf.steps[frames[-1][0]]
                assert isinstance(loop, LoopStep)
                self._iterate(frames, loop, frames[-1][1] + 1, state, run_input, out)
                if out.failure:
                    return out
                continue
            step = self.wf.steps[name]
            if isinstance(step, DecisionStep):
                try:
                    target, detail = self._route(step, state, run_input)
                except ExpressionError as exc:
                    out.failure = (name, step_path(frames), StepError(str(exc), retryable=False))
                    return out
                out.decisions.append(Decision(name, step_path(frames), target, detail))
                frames[-1] = [target, None]
            elif isinstance(step, LoopStep) and index is None:
                self._iterate(frames, step, 0, state, run_input, out)
                if out.failure:
                    return out
            else:
                break
        out.frames = frames
        return out

    def _route(
        self, step: DecisionStep, state: dict[str, Any], run_input: Any
    ) -> tuple[str, dict[str, Any]]:
        for i, route in enumerate(step.routes):
            if self.expr(route.when).evaluate(state, run_input):
                return route.next, {"route": i, "when": route.when, "next": route.next}
        return step.default, {"route": "default", "next": step.default}

    def _iterate(
        self,
        frames: Frames,
        loop: LoopStep,
        i: int,
        state: dict[str, Any],
        run_input: Any,
        out: Settled,
    ) -> None:
        """Enter iteration ``i`` of the loop on top of ``frames``, or leave the loop."""
        path = step_path([*frames[:-1], [loop.name, None]])
        try:
            if loop.mode == "ITERATE":
                items = self.loop_items(loop, state, run_input)
                if items is None:
                    items = []
                if not isinstance(items, list | tuple):
                    raise StepError(
                        f"'over: {loop.over}' is {type(items).__name__}, not a list",
                        retryable=False,
                    )
                go = i < len(items)
            else:
                assert loop.while_ is not None
                go = bool(self.expr(loop.while_).evaluate(state, run_input))
        except ExpressionError as exc:
            out.failure = (loop.name, path, StepError(str(exc), retryable=False))
            return
        except StepError as exc:
            out.failure = (loop.name, path, exc)
            return
        if go and i >= loop.max_iterations:
            out.failure = (
                loop.name,
                path,
                StepError(f"loop exceeded max_iterations={loop.max_iterations}", retryable=False),
            )
            return
        if go:
            frames[-1] = [loop.name, i]
            frames.append([self.wf.first(loop.name), None])
        else:
            out.decisions.append(
                Decision(loop.name, path, self.wf.following(loop.name), {"iterations": i})
            )
            frames[-1] = [self.wf.following(loop.name), None]
