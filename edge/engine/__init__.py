"""The Tillflow engine: durable YAML workflows over a Store and an Executor.

The public API is this module's ``__all__`` (pinned by a test); everything else in
``edge.engine`` is internal and may change.
"""

from edge.engine.audit import ChainReport
from edge.engine.clock import Clock, FakeClock, SystemClock
from edge.engine.context import StepContext
from edge.engine.executor import InlineExecutor, PollingExecutor
from edge.engine.loader import Workflow, load_file, load_text
from edge.engine.ports import Executor, Store
from edge.engine.records import RunRecord, RunView, Status
from edge.engine.runtime import Engine
from edge.engine.worker import Worker

__all__ = [
    "ChainReport",
    "Clock",
    "Engine",
    "Executor",
    "FakeClock",
    "InlineExecutor",
    "PollingExecutor",
    "RunRecord",
    "RunView",
    "Status",
    "StepContext",
    "Store",
    "SystemClock",
    "Worker",
    "Workflow",
    "load_file",
    "load_text",
]
