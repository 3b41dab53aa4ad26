"""The Fleet API's errors: one type a route raises, one body every caller reads.

::

    TillflowError
    └── ApiError            status + stable code + message + the field it was about
        (RouteRuleError, cloud.api.fleet.auth: the app refuses to build)

Every refusal is ``{"error": {"code", "message", "field"}}`` with the status it belongs
to: 401 ``unauthenticated``, 403 ``forbidden``/``no_rule``, 404 ``*_not_found``, 409 a
state conflict, 422 bad input (request validation names the field). The sync service's
own errors (``ServiceError``, ``BackendUnavailable``) are translated here, in one place,
so a route may call the service and let them pass: bad input is never a 5xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from edge.errors import TillflowError
from sync.server import BackendUnavailable, ServiceError

#: The status of each ``ServiceError`` code (anything else: 422, the input was wrong).
SERVICE_STATUS: Mapping[str, int] = {
    "unknown_device": 404,
    "device_revoked": 409,
    "stale_version": 409,
    "bad_group": 409,
    "no_signing_key": 503,
}
#: The API's code for a service code, where they differ (``device_not_found`` reads
#: like the other ``*_not_found``).
SERVICE_CODE: Mapping[str, str] = {"unknown_device": "device_not_found"}


class ApiError(TillflowError):
    """A refusal for the caller: ``raise ApiError(404, "device_not_found", "no device
    d1", field="device_id")``. ``headers`` go with the answer (401's WWW-Authenticate)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def from_service(exc: ServiceError) -> ApiError:
    """The API's answer to a refusal of the sync service."""
    status = SERVICE_STATUS.get(exc.code, 422)
    message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return ApiError(status, SERVICE_CODE.get(exc.code, exc.code), message)


def from_unavailable(exc: BackendUnavailable) -> ApiError:
    """The database failed on its own (down, deadlock, pool timeout): retry later."""
    return ApiError(
        503,
        "unavailable",
        f"the service is unavailable: {exc.message}",
        headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
    )


def from_validation(exc: RequestValidationError) -> ApiError:
    """A 422 naming the first field that failed (``body.store``, ``query.limit``), with
    every problem listed in the message."""
    errors = list(exc.errors())
    field = None
    parts = []
    for err in errors[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        field = field or loc or None
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "the request is not valid"
    # jsonable: a message quotes the input (bytes, or a float NaN) only as text
    return ApiError(422, "invalid_request", str(jsonable_encoder(message)), field=field)


__all__ = [
    "ApiError",
    "error_body",
    "from_service",
    "from_unavailable",
    "from_validation",
    "response",
]
