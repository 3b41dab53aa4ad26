"""The documents service's refusals. Each carries a stable ``code``, the ``field`` it
is about (when there is one) and the HTTP ``status`` the Fleet API answers it with, so
a route translates it in one line::

    TillflowError
    └── DocumentError          document_error
        ├── DocumentInvalid    invalid_document (422) the content fails the terminal's model
        ├── BadRequest         invalid_request (422)  a scope, value or kind that is not one
        ├── NotFound           *_not_found (404)      document, assignment, device, command
        └── StaleVersion       stale_version (409)    a version not above the newest
"""

from __future__ import annotations

from edge.errors import TillflowError


class DocumentError(TillflowError):
    code = "document_error"
    status = 422

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.field = field


class DocumentInvalid(DocumentError):
    """The content is not what the terminal's model takes; ``field`` is the first bad
    one (``content.risk.floor_limit_minor``), ``problems`` every one."""

    code = "invalid_document"

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        text = "; ".join(f"{f}: {m}" for f, m in problems[:10])
        super().__init__(f"the document is not valid: {text}", field=problems[0][0])


class BadRequest(DocumentError):
    code = "invalid_request"


class NotFound(DocumentError):
    status = 404

    def __init__(self, code: str, message: str, *, field: str | None = None):
        super().__init__(message, field=field)
        self.code = code


class StaleVersion(DocumentError):
    code = "stale_version"
    status = 409


__all__ = ["BadRequest", "DocumentError", "DocumentInvalid", "NotFound", "StaleVersion"]
