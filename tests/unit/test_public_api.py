"""The public surface, pinned: ``edge.engine.__all__`` and the error tree of ``edge.errors``.

A change here is an API change: make it on purpose, and update this file with it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import edge
import edge.engine
import edge.errors
from edge.errors import StepError, StoreError, TillflowError

ENGINE_API = [
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

#: class -> (parent, code, retryable by default)
ERROR_TREE = {
    "TillflowError": (None, "tillflow_error", False),
    "DefinitionError": ("TillflowError", "definition_invalid", False),
    "ExpressionError": ("TillflowError", "expression_invalid", False),
    "ConfigError": ("TillflowError", "config_invalid", False),
    "NotFound": ("TillflowError", "not_found", False),
    "RunNotFound": ("NotFound", "run_not_found", False),
    "WorkflowNotFound": ("NotFound", "workflow_not_found", False),
    "InvalidRunState": ("TillflowError", "invalid_run_state", False),
    "InputError": ("TillflowError", "input_invalid", False),
    "StepError": ("TillflowError", "step_failed", True),
    "StepTimeout": ("StepError", "step_timeout", True),
    "MergeConflict": ("StepError", "merge_conflict", False),
    "CodeChanged": ("TillflowError", "code_changed", False),
    "StoreError": ("TillflowError", "store_error", False),
    "MigrationError": ("StoreError", "migration_failed", False),
    "LeaseLost": ("StoreError", "lease_lost", False),
    "LimitExceeded": ("TillflowError", "limit_exceeded", False),
    "StorageFull": ("StoreError", "storage_full", False),
    "BundleInvalid": ("TillflowError", "bundle_invalid", False),
}


def error_classes() -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(edge.errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == edge.errors.__name__
    }


def sample(cls: type[TillflowError]) -> TillflowError:
    """An instance built the way the class's own constructor wants."""
    if cls is edge.errors.DefinitionError:
        return cls([])
    return cls("boom")


# --- edge.engine -------------------------------------------------------------------------


def test_engine_all__is_exactly_the_pinned_sorted_list():
    assert edge.engine.__all__ == ENGINE_API
    assert sorted(edge.engine.__all__) == edge.engine.__all__


@pytest.mark.parametrize("name", ENGINE_API)
def test_engine_all__every_name_is_importable(name):
    obj = getattr(edge.engine, name)
    module = importlib.import_module(obj.__module__)
    assert module.__name__.startswith("edge.engine")
    namespace: dict[str, object] = {}
    exec("from edge.engine import *", namespace)
    assert namespace[name] is obj


# --- edge.errors ---------------------------------------------------------------------------


def test_errors__the_tree_is_exactly_the_pinned_one():
    classes = error_classes()
    assert set(classes) == set(ERROR_TREE)
    for name, (parent, _, _) in ERROR_TREE.items():
        cls = classes[name]
        if parent is None:
            assert cls.__bases__ == (Exception,)
        else:
            assert cls.__bases__ == (classes[parent],), name


@pytest.mark.parametrize("name", sorted(ERROR_TREE))
def test_errors__every_class_derives_from_the_root_and_has_its_pinned_code(name):
    cls = error_classes()[name]
    _, code, retryable = ERROR_TREE[name]
    assert issubclass(cls, TillflowError)
    assert cls.code == code
    err = sample(cls)
    assert (err.code, err.retryable) == (code, retryable)


def test_errors__codes_are_distinct_and_non_empty():
    codes = [cls.code for cls in error_classes().values()]
    assert all(isinstance(c, str) and re.fullmatch(r"[a-z][a-z_]*", c) for c in codes)
    assert len(set(codes)) == len(codes)


def drawn_tree() -> dict[str, str | None]:
    """class -> parent, as ``edge.errors``' docstring draws them."""
    drawn: dict[str, str | None] = {}
    stack: list[str] = []
    root_column = None
    for line in (edge.errors.__doc__ or "").splitlines():
        m = re.match(r"^[\s│├└─]*([A-Z][A-Za-z]+)\b", line)
        if m is None or (root_column is None and m.group(1) != "TillflowError"):
            continue
        if root_column is not None and "──" not in line:
            break  # the prose after the drawing
        if root_column is None:
            root_column = m.start(1)
        depth = (m.start(1) - root_column) // 4  # each level indents four columns
        del stack[depth:]
        drawn[m.group(1)] = stack[-1] if stack else None
        stack.append(m.group(1))
    return drawn


def every_error_class_of_edge() -> dict[str, str | None]:
    """class -> parent, of every subclass of TillflowError that ``edge`` defines."""
    for mod in pkgutil.walk_packages(edge.__path__, "edge."):
        importlib.import_module(mod.name)
    found: dict[str, str | None] = {"TillflowError": None}
    todo = [TillflowError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.split(".")[0] == "edge":
                assert sub.__name__ not in found, f"two error classes named {sub.__name__}"
                found[sub.__name__] = cls.__name__
                todo.append(sub)
    return found


def test_errors__the_docstring_draws_the_same_tree():
    drawn = drawn_tree()
    assert {n: drawn.get(n, "(not drawn)") for n in ERROR_TREE} == {
        name: parent for name, (parent, _, _) in ERROR_TREE.items()
    }


def test_errors__the_docstring_draws_every_error_class_of_edge_wherever_it_is_defined():
    assert drawn_tree() == every_error_class_of_edge()


def test_errors__step_error_retryable_is_chosen_by_the_raiser():
    assert StepError("again").retryable is True
    assert StepError("never", retryable=False).retryable is False
    assert edge.errors.MergeConflict("collision").retryable is False


def test_errors__store_error_says_operation_path_hint_and_whether_retry_may_help():
    err = StoreError("busy", operation="commit", path="/t.db", hint="wait", retryable=True)
    assert (err.operation, err.path, err.retryable) == ("commit", "/t.db", True)
    assert str(err) == "busy (wait)"
    assert StoreError("corrupt").retryable is False


def test_errors__definition_error_counts_and_lists_its_problems():
    problems = [
        edge.errors.Problem("wf.yaml", 3, "charge", "next", "unknown step 'x'"),
        edge.errors.Problem("wf.yaml", None, None, None, "cannot read"),
    ]
    err = edge.errors.DefinitionError(problems)
    assert err.problems == problems
    assert str(err) == (
        "2 problems in workflow definition:\n"
        "  wf.yaml:3, step 'charge', field 'next': unknown step 'x'\n"
        "  wf.yaml: cannot read"
    )
