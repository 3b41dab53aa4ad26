"""Config and fraud-policy documents for the fleet, and the commands that carry them.

- ``validate``: a document checked with the terminal's own pydantic models
  (``ConfigDocument``, ``PolicyDocument``), each problem naming its field;
- ``service``: versions (only growing, per kind), scoped assignments (fleet, group,
  store, device) with ``assign``/``unassign`` (a saga step and its compensation), and
  the effective document of a device;
- ``scope``: the precedence rule, pure (device > store > group > fleet);
- ``commands``: send to a device, a group or a store (one call, one batch), and each
  command's status (queued, delivered, applied, refused, expired).

Each works in the caller's transaction on the sync service's tables
(``cloud/sync/sql``); the Fleet API's routes are ``cloud.api.fleet.routes.documents``
and ``.commands``.
"""

from cloud.documents.errors import (
    BadRequest,
    DocumentError,
    DocumentInvalid,
    NotFound,
    StaleVersion,
)
from cloud.documents.service import Assignment, DocumentVersion, Effective, assign, unassign

__all__ = [
    "Assignment",
    "BadRequest",
    "DocumentError",
    "DocumentInvalid",
    "DocumentVersion",
    "Effective",
    "NotFound",
    "StaleVersion",
    "assign",
    "unassign",
]
