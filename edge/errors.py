"""Tillflow's errors: one root, a stable ``code`` each, and whether retrying may help.

::

    TillflowError
    ├── DefinitionError        a workflow YAML is invalid (carries every Problem found)
    ├── ExpressionError        an expression is outside the safe subset, or failed to evaluate
    ├── ImportPathError        a step's import path does not import (edge.engine.imports)
    ├── ConfigError            a command-line or settings value is unusable
    ├── NotFound
    │   ├── RunNotFound
    │   └── WorkflowNotFound
    ├── InvalidRunState        the run is not in a state that allows the operation
    ├── InputError             resume input does not match the WAIT step's schema
    ├── StepError              raised by step code; ``retryable`` picks retry vs. fail now
    │   ├── StepTimeout
    │   ├── MergeConflict      PARALLEL results collided with ``on_conflict: error``
    │   ├── AuthorizationNotSent      the request never left the terminal (sale.payment_steps)
    │   ├── AuthorizationUnanswered   sent, no answer: the outcome is unknown
    │   └── RefundIrreversible        an approved refund cannot be undone (sale.txn_steps)
    ├── CodeChanged            a step's code changed under a running run (on_code_change: fail)
    ├── LimitExceeded          a step's guarded counter would pass its cap (``reason`` says which)
    ├── StoreError             the database refused or failed (translated from the driver)
    │   ├── MigrationError
    │   ├── LeaseLost          another worker advanced the run; this outcome was not committed
    │   └── StorageFull        the database cannot grow; new work is declined, nothing lost
    ├── BundleInvalid          a release bundle's signature or checksums do not verify
    ├── CardDataError          card data unusable (edge.terminal.carddata)
    │   ├── PanInvalid         not a card number
    │   ├── CardKeyError       the card-data key file is missing, short or unreadable
    │   └── CardTokenError     a PAN token does not decrypt under this key
    ├── DeviceError            a peripheral or the acquirer failed (terminal.drivers.contracts)
    │   ├── CardReadError
    │   ├── PrinterError
    │   │   ├── PaperOut       the operator refills, the run waits
    │   │   └── PrinterJam
    │   │       └── PrinterUnavailable   the printer service does not answer (devices_http)
    │   ├── AcquirerUnavailable        not reached, or no answer (``outcome_unknown``)
    │   └── AcquirerError              the acquirer answered with an error
    └── PolicyError            a fraud policy problem (edge.terminal.sale.policy)
        ├── PolicyInvalid
        ├── PolicyVersionConflict
        ├── NoPreviousPolicy
        ├── PolicyStoreError
        └── PolicyInputError

Every error class of ``edge`` is drawn here, wherever it is defined
(tests/unit/test_public_api.py walks the package and fails on one left out).
Driver exceptions (apsw, psycopg) are translated where they are raised, with
``raise ... from exc``; nothing above the store sees a driver type.
"""

from __future__ import annotations

from dataclasses import dataclass


class TillflowError(Exception):
    """Root of every error Tillflow raises on purpose."""

    code: str = "tillflow_error"
    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a workflow definition, located as precisely as we can."""

    file: str
    line: int | None
    step: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        parts = [where]
        if self.step:
            parts.append(f"step '{self.step}'")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join([", ".join(parts), self.message])


class DefinitionError(TillflowError):
    code = "definition_invalid"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in workflow definition"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class ExpressionError(TillflowError):
    code = "expression_invalid"


class ConfigError(TillflowError):
    code = "config_invalid"


class NotFound(TillflowError):
    code = "not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"


class InvalidRunState(TillflowError):
    code = "invalid_run_state"


class InputError(TillflowError):
    code = "input_invalid"


class StepError(TillflowError):
    """Raise from a step to fail it; ``retryable=False`` skips the remaining attempts."""

    code = "step_failed"

    def __init__(self, message: str, *, retryable: bool = True, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class StepTimeout(StepError):
    code = "step_timeout"


class MergeConflict(StepError):
    code = "merge_conflict"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class CodeChanged(TillflowError):
    code = "code_changed"


class LimitExceeded(TillflowError):
    """A guard of a step's commit would take a counter past its cap; nothing was committed.

    ``reason`` is machine-readable (e.g. ``offline_amount_cap``), for a decline to carry.
    """

    code = "limit_exceeded"

    def __init__(self, message: str, *, reason: str = "limit_exceeded") -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(TillflowError):
    """The database failed. ``operation`` and ``path`` say where; ``retryable`` says if a
    second try may succeed (busy, serialization failure) or not (corruption, schema)."""

    code = "store_error"

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        path: str = "",
        hint: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, hint=hint)
        self.operation = operation
        self.path = path
        self.retryable = retryable


class MigrationError(StoreError):
    code = "migration_failed"


class LeaseLost(StoreError):
    code = "lease_lost"


class StorageFull(StoreError):
    code = "storage_full"


class BundleInvalid(TillflowError):
    """A release bundle's signature or checksums do not verify
    (``edge.terminal.service.release``)."""

    code = "bundle_invalid"
