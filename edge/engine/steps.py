"""Running one attempt of an action step: call the code, return what it produced.

Everything here happens OUTSIDE the step's transaction and may be repeated after a
crash; the engine commits the result. Exceptions mean "this attempt failed"; a
``StepError(retryable=False)`` means "do not try again".
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from edge.engine.context import StepContext, idempotency_key
from edge.engine.definition import ActionStep, HttpStep, ParallelStep, StandardStep, SubWorkflowStep
from edge.engine.loader import Workflow
from edge.engine.records import RunRecord, Status
from edge.engine.templating import render
from edge.errors import ExpressionError, MergeConflict, StepError, StepTimeout

if TYPE_CHECKING:
    # Imported where used: httpx by run_http (only a workflow with an HTTP step needs
    # it), concurrent.futures by the first step with a timeout or parallel tasks.
    from concurrent.futures import Future, ThreadPoolExecutor

    import httpx

#: Seconds an HTTP step waits when its YAML gives no timeout_s: a payment terminal's
#: host link should answer well inside this, and a hung socket must not hold the run.
DEFAULT_HTTP_TIMEOUT_S = 10.0

_timeout_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """Run ``fn``; past ``timeout_s`` the attempt fails with StepTimeout.

    Python cannot stop a thread: the abandoned call may still finish in the
    background. That is why steps carry idempotency keys; the next attempt has a new one.
    """
    if timeout_s is None:
        return fn()
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    global _timeout_pool
    with _pool_lock:
        if _timeout_pool is None:
            _timeout_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tillflow-step")
    future: Future[Any] = _timeout_pool.submit(fn)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout as exc:
        raise StepTimeout(f"step did not finish within {timeout_s}s") from exc


def validation_problem(exc: ValidationError) -> str:
    """``exc`` as ``loc: msg`` parts, without the input values its ``str()`` quotes (a
    state or an input may hold card data; these messages reach run errors and logs)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(input)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    )


def state_view(state: dict[str, Any], model: type[BaseModel] | None) -> Any:
    """What a step function sees: the state model instance, else a private copy."""
    if model is None:
        return copy.deepcopy(state)
    try:
        return model.model_validate(state)
    except ValidationError as exc:
        problem = validation_problem(exc)
        raise StepError(
            f"state does not match {model.__name__}: {problem}", retryable=False
        ) from None


def apply_output(
    state: dict[str, Any], output: Any, output_key: str | None, model: type[BaseModel] | None
) -> tuple[dict[str, Any], BaseModel | None]:
    """The new state after a step returned ``output`` (shallow merge, or under output_key),
    and, with a state model, the validated instance (so the next step need not re-validate).

    Only the output is checked for JSON-safety: the state it merges into already was.
    """
    if output is None:
        return state, None
    if isinstance(output, BaseModel):
        output = output.model_dump(mode="json")
    new = dict(state)
    if output_key:
        new[output_key] = output
    elif isinstance(output, Mapping):
        new.update(output)
    else:
        raise StepError(
            f"step returned {type(output).__name__}; return a dict (merged into the state), "
            "None, or set output_key",
            retryable=False,
        )
    if model is None:
        ensure_json(output)
        return new, None
    try:
        instance = model.model_validate(new)
        return instance.model_dump(mode="json"), instance
    except ValidationError as exc:
        problem = validation_problem(exc)
        raise StepError(
            f"new state does not match {model.__name__}: {problem}", retryable=False
        ) from None
    except PydanticSerializationError as exc:
        raise StepError(f"new state is not JSON-serialisable: {exc}", retryable=False) from exc


def ensure_json(value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise StepError(f"step output is not JSON-serialisable: {exc}", retryable=False) from exc


def merge(
    base: dict[str, Any],
    update: Mapping[str, Any],
    *,
    deep: bool,
    on_conflict: str,
    where: str = "",
) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``. A conflict is a key present on both sides
    with different values (for ``deep``: different non-dict values at the same path)."""
    out = dict(base)
    for key, new in update.items():
        if key not in out or out[key] == new:
            out[key] = new
            continue
        old = out[key]
        if deep and isinstance(old, dict) and isinstance(new, Mapping):
            out[key] = merge(old, new, deep=True, on_conflict=on_conflict, where=f"{where}{key}.")
        elif on_conflict == "prefer_new":
            out[key] = new
        elif on_conflict == "error":
            raise MergeConflict(f"parallel results conflict at '{where}{key}': {old!r} vs {new!r}")
        # prefer_existing: keep old
    return out


def run_parallel(
    step: ParallelStep,
    functions: Mapping[str, Callable[..., Any]],
    state: dict[str, Any],
    model: type[BaseModel] | None,
    ctx: StepContext,
) -> dict[str, Any]:
    """Run every task on a thread pool; merge their dicts in declared order.

    Returns ``{"state": merged_state, "errors": {task: message}}``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def task_ctx(name: str) -> StepContext:
        path = f"{ctx.step}/{name}"
        return StepContext(
            run_id=ctx.run_id,
            step=path,
            attempt=ctx.attempt,
            idempotency_key=idempotency_key(ctx.run_id, path, ctx.attempt),
            clock=ctx.clock,
            input=ctx.input,
            item=ctx.item,
            index=ctx.index,
            last_attempt=ctx.last_attempt,
            replay=ctx.replay,
            services=ctx.services,
        )

    contexts = {t.name: task_ctx(t.name) for t in step.tasks}
    workers = step.max_workers or min(8, len(step.tasks))
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tillflow-parallel") as pool:
        futures = {
            t.name: pool.submit(functions[t.function], state_view(state, model), contexts[t.name])
            for t in step.tasks
        }
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as exc:  # a task's failure is data here; policy decides below
                errors[name] = f"{type(exc).__name__}: {exc}"
    if errors and not step.allow_partial:
        first = next(iter(errors))
        raise StepError(f"parallel task '{first}' failed: {errors[first]}")
    merged = dict(state)
    for t in step.tasks:
        out = results.get(t.name)
        if out is None:
            continue
        if isinstance(out, BaseModel):
            out = out.model_dump(mode="json")
        if not isinstance(out, Mapping):
            raise StepError(
                f"parallel task '{t.name}' returned {type(out).__name__}, not a dict",
                retryable=False,
            )
        merged = merge(merged, out, deep=step.merge == "deep", on_conflict=step.on_conflict)
    for c in contexts.values():
        ctx._emitted.extend(c._emitted)
        ctx._guards.extend(c._guards)
    return {"state": merged, "errors": errors}


def run_http(
    step: HttpStep, client: httpx.Client, state: Any, run_input: Any, ctx: StepContext
) -> dict[str, Any]:
    """One HTTP call; the step's idempotency key travels as the Idempotency-Key header."""
    import httpx  # the client came from Engine._http_client, which imported it already

    try:
        url = render(step.url, state, run_input)
        headers = render(step.headers, state, run_input)
        body = render(step.body, state, run_input)
    except ExpressionError as exc:
        raise StepError(f"cannot render request: {exc}", retryable=False) from exc
    assert isinstance(headers, dict)
    headers = {str(k): str(v) for k, v in headers.items()}
    headers.setdefault("Idempotency-Key", ctx.idempotency_key)
    kwargs: dict[str, Any] = {
        "headers": headers,
        "timeout": step.timeout_s or DEFAULT_HTTP_TIMEOUT_S,
    }
    if body is not None:
        kwargs["json"] = body
    try:
        response = client.request(step.method, str(url), **kwargs)
    except httpx.TimeoutException as exc:
        raise StepTimeout(f"{step.method} {url}: timed out") from exc
    except httpx.HTTPError as exc:
        raise StepError(f"{step.method} {url}: {type(exc).__name__}: {exc}") from exc
    try:
        payload: Any = response.json()
    except ValueError:
        payload = response.text
    if response.status_code >= 400:
        retryable = response.status_code >= 500 or response.status_code in (408, 429)
        raise StepError(f"{step.method} {url}: HTTP {response.status_code}", retryable=retryable)
    return {"status": response.status_code, "body": payload}


def invoke(
    step: Any,
    wf: Workflow,
    run: RunRecord,
    ctx: StepContext,
    state_view_of: Callable[[Workflow, RunRecord], Any],
    http_client: Callable[[], httpx.Client],
    get_run: Callable[[str], RunRecord | None],
) -> tuple[dict[str, Any] | None, BaseModel | None, Any]:
    """Run one attempt of an action step: (new state, its model instance, output to record).
    A None state means "keep waiting" (a sub-workflow's child is not finished)."""
    model = wf.state_model
    if isinstance(step, StandardStep):
        fn = wf.functions[step.function]
        view = state_view_of(wf, run)
        out = call_with_timeout(lambda: fn(view, ctx), step.timeout_s)
        state, instance = apply_output(run.state, out, step.output_key, model)
        return state, instance, out
    if isinstance(step, ParallelStep):
        res = call_with_timeout(
            lambda: run_parallel(step, wf.functions, run.state, model, ctx), step.timeout_s
        )
        state, instance = apply_output(res["state"], {}, None, model)
        return state, instance, {"errors": res["errors"]} if res["errors"] else None
    if isinstance(step, HttpStep):
        out = run_http(step, http_client(), run.state, run.input, ctx)
        state, instance = apply_output(run.state, out, step.output_key or step.name, model)
        return state, instance, {"status": out["status"]}
    if isinstance(step, SubWorkflowStep):
        child = get_run(run.cursor["child"])
        if child is None or not child.status.terminal:
            return None, None, None
        if child.status is not Status.COMPLETED:
            raise StepError(
                f"child run {child.run_id} ({child.workflow_type}) ended {child.status}"
            )
        state, instance = apply_output(run.state, child.state, step.output_key, model)
        return state, instance, {"child": child.run_id}
    raise AssertionError(f"no executor for step type {type(step).__name__}")


def compensate(step: ActionStep, wf: Workflow, run: RunRecord, ctx: StepContext) -> dict[str, Any]:
    """Run one attempt of ``step``'s compensation: the new state (its output merged in)."""
    assert step.compensate
    fn = wf.functions[step.compensate]
    view = state_view(run.state, wf.state_model)
    out = call_with_timeout(lambda: fn(view, ctx), step.timeout_s)
    new_state, _ = apply_output(run.state, out, None, wf.state_model)
    return new_state
