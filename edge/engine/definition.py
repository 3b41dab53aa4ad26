"""Workflow definitions: the YAML schema as strict pydantic models.

Every model forbids unknown keys, so a typo is an error that names its file, step and
field (see ``loader.py``, which turns validation errors into located Problems).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

#: A jump target that ends the current sequence (the workflow, or one loop iteration).
END = "END"

STEP_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


#: ``max_attempts: forever``: retry until the step succeeds (the backoff still grows to
#: ``max_backoff_s``). For an effect that must never be given up on, such as a reversal
#: that releases a customer's money: the run waits, durably, across restarts.
FOREVER: Literal["forever"] = "forever"


def _max_attempts(value: object) -> int | Literal["forever"]:
    """One clear error for either spelling (a union would report one per branch)."""
    if value == FOREVER:
        return FOREVER
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100:
        return value
    raise ValueError(f"must be greater than or equal to 1 and at most 100, or '{FOREVER}'")


class RetryPolicy(_Strict):
    """How often a step is tried and how long to wait between tries (durably)."""

    max_attempts: Annotated[int | Literal["forever"], PlainValidator(_max_attempts)] = 1
    initial_backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(300.0, ge=0)
    multiplier: float = Field(2.0, ge=1.0)
    jitter: float = Field(0.1, ge=0, le=1.0)

    def allows_retry_after(self, attempt: int) -> bool:
        """Whether failed ``attempt`` (1-based) may be tried again."""
        limit = self.max_attempts
        return limit == FOREVER or (isinstance(limit, int) and attempt < limit)


class _Step(_Strict):
    name: str = Field(pattern=STEP_NAME, max_length=64)
    description: str | None = None
    next: str | None = None


class ActionStep(_Step):
    """A step with effects: it may be retried, time out, and be compensated."""

    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(None, gt=0)
    compensate: str | None = None
    #: Retries of the compensation; when absent, the step's own ``retry``.
    compensate_retry: RetryPolicy | None = None

    @property
    def compensation_retry(self) -> RetryPolicy:
        return self.compensate_retry or self.retry


class StandardStep(ActionStep):
    type: Literal["STANDARD"]
    function: str
    output_key: str | None = None


class Route(_Strict):
    when: str
    next: str


class DecisionStep(_Step):
    type: Literal["DECISION"]
    routes: list[Route] = Field(min_length=1)
    default: str


class LoopStep(_Step):
    type: Literal["LOOP"]
    mode: Literal["ITERATE", "WHILE"]
    over: str | None = None
    while_: str | None = Field(None, alias="while")
    max_iterations: int = Field(ge=1, le=1_000_000)
    body: list[Step] = Field(min_length=1)


class Task(_Strict):
    name: str = Field(pattern=STEP_NAME, max_length=64)
    function: str


class ParallelStep(ActionStep):
    type: Literal["PARALLEL"]
    tasks: list[Task] = Field(min_length=1)
    merge: Literal["shallow", "deep"] = "shallow"
    on_conflict: Literal["prefer_new", "prefer_existing", "error"] = "prefer_new"
    allow_partial: bool = False
    max_workers: int | None = Field(None, ge=1, le=64)


class HttpStep(ActionStep):
    type: Literal["HTTP"]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str
    headers: dict[str, str] = {}
    body: Any = None
    output_key: str | None = None


class WaitStep(_Step):
    type: Literal["WAIT"]
    input_schema: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    on_timeout: str | None = None
    output_key: str | None = None


class SubWorkflowStep(ActionStep):
    type: Literal["SUB_WORKFLOW"]
    workflow: str
    input: dict[str, Any] = {}
    output_key: str | None = None


class FireAndForgetStep(ActionStep):
    type: Literal["FIRE_AND_FORGET"]
    workflow: str
    input: dict[str, Any] = {}
    output_key: str | None = None


Step = Annotated[
    StandardStep
    | DecisionStep
    | LoopStep
    | ParallelStep
    | HttpStep
    | WaitStep
    | SubWorkflowStep
    | FireAndForgetStep,
    Field(discriminator="type"),
]

STEP_TYPES = (
    "STANDARD",
    "DECISION",
    "LOOP",
    "PARALLEL",
    "HTTP",
    "WAIT",
    "SUB_WORKFLOW",
    "FIRE_AND_FORGET",
)

#: The model of each step ``type``.
STEP_MODELS: dict[str, type[BaseModel]] = {
    "STANDARD": StandardStep,
    "DECISION": DecisionStep,
    "LOOP": LoopStep,
    "PARALLEL": ParallelStep,
    "HTTP": HttpStep,
    "WAIT": WaitStep,
    "SUB_WORKFLOW": SubWorkflowStep,
    "FIRE_AND_FORGET": FireAndForgetStep,
}

AnyStep = (
    StandardStep
    | DecisionStep
    | LoopStep
    | ParallelStep
    | HttpStep
    | WaitStep
    | SubWorkflowStep
    | FireAndForgetStep
)


class WorkflowDefinition(_Strict):
    workflow_type: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$", max_length=128)
    version: int | str
    description: str | None = None
    state_model: str | None = None
    saga: bool = False
    on_code_change: Literal["warn", "fail"] = "warn"
    steps: list[Step] = Field(min_length=1)


LoopStep.model_rebuild()
WorkflowDefinition.model_rebuild()
