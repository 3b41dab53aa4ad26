"""The local API for the POS app: HTTP + JSON over a Unix socket (stdlib server: small).

    POST /v1/payments          {amount_minor, currency, idempotency_key}
    POST /v1/refunds           {amount_minor, currency, idempotency_key, original_run_id?}
    POST /v1/voids             {payment_run_id, idempotency_key}
    GET  /v1/runs/{id}
    POST /v1/runs/{id}/input   answers a WAIT (paper loaded, signature, approval)
    GET  /v1/health

Errors are ``{"error": {"code", "message", "field"?}}`` with a 4xx/5xx status. No error
message, exception or log line here ever quotes a value the POS app sent: a careless
client may put a card number in any field. What is accepted:

* **A body** is one JSON object in UTF-8, at most ``MAX_BODY_BYTES`` (413
  ``body_too_large``). Not UTF-8, not JSON, ``NaN``/``Infinity``, a key given twice, a
  number of thousands of digits or nesting past the parser's depth: 400
  ``malformed_json``; JSON but not an object: 400 ``malformed_request``.
* **Fields** strictly: exact types, no unknown field. 422 ``missing_field``,
  ``invalid_field`` or ``unknown_field``, with ``field`` naming it.
* **currency**: one of the terminal's ``currencies`` (config, ISO 4217), else 422
  ``currency_not_accepted`` -- checked before the key is looked up, so a retry after the
  currency was dropped from the config is refused too (``GET /v1/runs/{id}`` still
  answers).
* **idempotency_key**: 1-128 visible ASCII characters, ``!`` to ``~`` (no space, no
  control character, nothing outside ASCII). UUIDs, ULIDs and keys built of letters,
  digits and punctuation fit; what is refused either looks like another key (spaces,
  look-alike letters, bidi controls) or breaks a log line (NUL, newline).
  A key starts at most one run per route, and is bound to the parameters it came with
  (as Stripe's are): the same key with the same parameters answers with the run it
  started (200, a retry), with different ones 409 ``idempotency_key_reused``, ``field``
  the first that differs and the message naming all of them. The parameters are compared
  with the input stored with the run, which the same transaction that took the key wrote:
  there is no separate fingerprint to keep in step, and the fields that differ can be
  named.
* **A WAIT's input** (``/input``): at most ``MAX_INPUT_BYTES``, else 413
  ``input_too_large``; nothing shaped like card data (a field named like a PAN, CVV,
  track or PIN, a value shaped like a card number), else 422 ``card_data_refused``; and
  exactly the fields the step's ``input_schema`` declares, strictly. A WAIT without a
  schema takes ``{}`` only.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.engine import RunRecord, Status
from edge.engine.definition import WaitStep
from edge.errors import InputError, InvalidRunState, NotFound, StorageFull, TillflowError
from edge.terminal.carddata import luhn_valid, scrub
from edge.terminal.sale.views import run_view
from edge.terminal.service.httplimits import MAX_BODY_BYTES
from edge.terminal.service.httpserver import UnixHttpServer
from edge.terminal.service.terminal import Terminal

log = logging.getLogger(__name__)

# MAX_BODY_BYTES (the transport's cap, a payment is a few hundred bytes) is checked here
# too: the routes do not rely on sitting behind that transport.

#: Largest answer to a WAIT: a flag, a choice, a reference to a signature captured
#: elsewhere. It is merged into the run's state and kept in its step row, both in the
#: terminal's size-budgeted database for as long as the run is retained, so an image or
#: a document belongs somewhere else, named here by a reference.
MAX_INPUT_BYTES = 4 * 1024

#: Visible ASCII, 1-128 characters (see the module docstring for why).
IDEMPOTENCY_KEY = r"^[!-~]+$"
#: A run id as the routes take it.
RUN_ID = r"^[A-Za-z0-9_-]{1,64}$"


class _Request(BaseModel):
    # defer_build: each body's validator is built by its first request, not at start.
    model_config = ConfigDict(
        extra="forbid", strict=True, hide_input_in_errors=True, defer_build=True
    )


class PaymentRequest(_Request):
    amount_minor: int = Field(gt=0, le=100_000_000)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    idempotency_key: str = Field(min_length=1, max_length=128, pattern=IDEMPOTENCY_KEY)


class RefundRequest(PaymentRequest):
    original_run_id: str | None = Field(None, pattern=RUN_ID)


class VoidRequest(_Request):
    payment_run_id: str = Field(pattern=RUN_ID)
    idempotency_key: str = Field(min_length=1, max_length=128, pattern=IDEMPOTENCY_KEY)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


M = TypeVar("M", bound=BaseModel)

# Refusals below are raised outside the ``except`` that found them, so that neither
# ``__cause__`` nor ``__context__`` holds the original exception (whose text quotes the
# input): a traceback logged anywhere above shows only our own message.


class _Unacceptable(ValueError):
    """JSON we refuse although the parser would take it."""


def _no_constant(name: str) -> Any:
    raise _Unacceptable(f"{name} is not a JSON number (RFC 8259)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # which one counts differs between parsers: refuse the ambiguity
            raise _Unacceptable(f"key '{scrub(key)}' appears twice")
        out[key] = value
    return out


def _loads(raw: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why it is not acceptable JSON (never quoting the body)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not UTF-8 (invalid byte at offset {exc.start})"
    try:
        data = json.loads(
            text or "null", parse_constant=_no_constant, object_pairs_hook=_no_duplicates
        )
    except json.JSONDecodeError as exc:
        return None, f"body is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
    except _Unacceptable as exc:
        return None, f"body is not JSON this API accepts: {exc}"
    except RecursionError:
        return None, "body is not JSON this API accepts: nested too deeply"
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        return None, "body is not JSON this API accepts: a number has too many digits"
    return data, None


def json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as one JSON object; else ApiError 400."""
    data, problem = _loads(raw)
    if problem is not None:
        raise ApiError(400, "malformed_json", problem)
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_request", "body must be a JSON object")
    return data


def _refusal(exc: ValidationError) -> ApiError:
    """The first error of ``exc`` as a 422 naming the field, without the input. Field
    names are scrubbed too: a key may itself be a card number."""
    first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    field = scrub(".".join(str(x) for x in first["loc"])) or None
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(
        first["type"], "invalid_field"
    )
    return ApiError(422, code, f"{field or '(body)'}: {scrub(first['msg'])}", field)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as ``model``, strictly and with no unknown top-level field whatever the
    model's own config says; else ApiError 422 that does not quote the input.

    Strict as JSON is (``model_validate_json``): a date or an enum arrives as its JSON
    string, which strict Python-mode validation would refuse."""
    names = {*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)}
    unknown = next((key for key in data if key not in names), None)
    if unknown is not None:
        field = scrub(unknown)
        raise ApiError(422, "unknown_field", f"{field}: Extra inputs are not permitted", field)
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        refusal = _refusal(exc)
    raise refusal


def parse_request(raw: bytes, model: type[M]) -> M:
    """A request body as ``model``: ``json_object`` then ``validated``."""
    return validated(model, json_object(raw))


# --- card data in a body ------------------------------------------------------------------

# Field names that mean card data, compared as words of the name (``pinBlock`` is ``pin``,
# ``block``; ``card_cvv2`` is ``card``, ``cvv2``) and as the whole name with only its
# letters and digits (``card-number`` is ``cardnumber``). Words, not substrings, so that
# ``company``, ``spinner`` or ``track_id`` pass.
_CARD_DATA_WORDS = frozenset(
    {"pan", "cvv", "cvv2", "cvc", "cvc2", "cav2", "csc", "cvn", "pin", "pinblock"}
    | {"track1", "track2", "track3", "trackdata", "magstripe"}
)
_CARD_DATA_NAMES = frozenset(
    {"cardnumber", "cardno", "primaryaccountnumber", "accountnumber", "securitycode"}
    | {"cardsecuritycode", "cardverificationvalue", "cardverificationcode", "pinblock"}
    | {"track", "track1data", "track2data", "trackdata", "magneticstripe", "magstripedata"}
)
_WORDS = re.compile(r"[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*(?![a-z])|[0-9]+")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def _card_data_name(name: str) -> bool:
    words = {w.lower() for w in _WORDS.findall(name)}
    return bool(words & _CARD_DATA_WORDS) or _NOT_ALNUM.sub("", name.lower()) in _CARD_DATA_NAMES


def _pan_shaped(value: object) -> bool:
    """A Luhn-valid run of 13-19 digits: bare, grouped, inside track data, or a number."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        digits = str(abs(value))
        return 13 <= len(digits) <= 19 and luhn_valid(digits)
    return isinstance(value, str) and scrub(value) != value


def _card_data_at(document: Any) -> tuple[str, str] | None:
    """Where in ``document`` (parsed JSON) something is shaped like card data, and what:
    a field named like a PAN, CVV, track or PIN, or a name or value shaped like a card
    number, at any depth. The path holds names and indexes only, a PAN-shaped name masked.

    A CVV or PIN *value* has no shape of its own (three or four digits): only its name
    gives it away. Iterative, so no nesting can exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            children = []
            for key, item in value.items():
                path = f"{where}.{scrub(key)}" if where else scrub(key)
                if _card_data_name(key):
                    return path, "a field named like card data"
                if _pan_shaped(key):
                    return path, "a name shaped like a card number"
                children.append((path, item))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif _pan_shaped(value):
            return where or "(body)", "a value shaped like a card number"
    return None


def refuse_card_data(data: Any) -> None:
    """ApiError 422 ``card_data_refused`` if ``data`` holds anything shaped like card data."""
    found = _card_data_at(data)
    if found is not None:
        where, what = found
        raise ApiError(
            422,
            "card_data_refused",
            f"{where}: {what}: card data is never accepted here; the terminal reads the "
            "card itself (send no PAN, CVV, track data or PIN)",
            where,
        )


Route = tuple[str, re.Pattern[str], str]


class LocalApi:
    """The routes, free of HTTP framing: ``handle(method, path, body)`` gives the status
    and the JSON body. The transport (``edge.terminal.service.httpserver``) does the I/O."""

    routes: tuple[Route, ...] = (
        ("POST", re.compile(r"^/v1/payments$"), "payment"),
        ("POST", re.compile(r"^/v1/refunds$"), "refund"),
        ("POST", re.compile(r"^/v1/voids$"), "void"),
        ("GET", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})$"), "get_run"),
        ("POST", re.compile(r"^/v1/runs/(?P<run_id>[A-Za-z0-9_-]{1,64})/input$"), "input"),
        ("GET", re.compile(r"^/v1/health$"), "health"),
    )

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One request: ``path`` without its query string. Never raises for bad input."""
        try:
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
            for verb, pattern, name in self.routes:
                m = pattern.match(path)
                if m:
                    if verb != method:
                        raise ApiError(405, "method_not_allowed", f"{method} is not allowed here")
                    result: tuple[int, dict[str, Any]] = getattr(self, f"_{name}")(
                        body, **m.groupdict()
                    )
                    return result
            raise ApiError(404, "not_found", f"no route {path}")
        except ApiError as exc:
            err = {"code": exc.code, "message": exc.message}
            if exc.field:
                err["field"] = exc.field
            return exc.status, {"error": err}
        except StorageFull as exc:
            # Nothing of this request committed past the last step that fit; the same
            # idempotency key, once there is room, continues or returns the same run.
            self.terminal.last_error = f"{exc.code}: {exc.message}"
            log.warning("%s %s refused: %s", method, path, exc.message, extra={"action": exc.code})
            message = f"{exc.message}; retry with the same idempotency key once there is room"
            return 507, {"error": {"code": exc.code, "message": message}}
        except TillflowError as exc:
            self.terminal.last_error = f"{exc.code}: {exc.message}"
            status = 503 if getattr(exc, "retryable", False) else 500
            return status, {"error": {"code": exc.code, "message": exc.message}}

    def _accept_currency(self, currency: str) -> None:
        accepted = self.terminal.cfg.currencies
        if currency not in accepted:
            raise ApiError(
                422,
                "currency_not_accepted",
                f"currency: {currency} is not accepted by this terminal "
                f"(it accepts {', '.join(accepted)})",
                "currency",
            )

    def _start(self, workflow: str, req: _Request, key: str) -> tuple[int, dict[str, Any]]:
        engine = self.terminal.engine
        data = req.model_dump(exclude={"idempotency_key"}, exclude_none=True)
        try:
            run_id = engine.start(workflow, data, idempotency_key=f"pos:{workflow}:{key}")
        except InputError as exc:  # the engine's messages name fields, never values
            refusal = ApiError(422, "invalid_input", exc.message)
        else:
            run = engine.get(run_id)
            _same_parameters(workflow, data, run)
            return 200, run_view(run)
        raise refusal

    def _payment(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, PaymentRequest)
        self._accept_currency(req.currency)
        return self._start("payment", req, req.idempotency_key)

    def _refund(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, RefundRequest)
        self._accept_currency(req.currency)
        return self._start("refund", req, req.idempotency_key)

    def _void(self, body: bytes) -> tuple[int, dict[str, Any]]:
        req = parse_request(body, VoidRequest)
        return self._start("void", req, req.idempotency_key)

    def _get_run(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        try:
            return 200, run_view(self.terminal.engine.get(run_id))
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc

    def _input(self, body: bytes, run_id: str) -> tuple[int, dict[str, Any]]:
        if len(body) > MAX_INPUT_BYTES:
            raise ApiError(
                413,
                "input_too_large",
                f"input over {MAX_INPUT_BYTES} bytes: a WAIT takes a short answer; "
                "keep a document elsewhere and send a reference to it",
            )
        data = json_object(body) if body else {}
        refuse_card_data(data)
        engine = self.terminal.engine
        try:
            run = engine.get(run_id)
        except NotFound as exc:
            raise ApiError(404, "run_not_found", exc.message) from exc
        self._check_wait_input(run, data)
        try:
            engine.resume(run_id, data)
        except NotFound as exc:
            refusal = ApiError(404, "run_not_found", exc.message)
        except InvalidRunState as exc:
            refusal = ApiError(409, "not_waiting", exc.message)
        except InputError as exc:  # the engine's messages name fields, never values
            refusal = ApiError(422, "invalid_input", exc.message)
        else:
            return 200, run_view(engine.get(run_id))
        raise refusal

    def _check_wait_input(self, run: RunRecord, data: dict[str, Any]) -> None:
        """``data`` against the schema of the WAIT ``run`` is at, strictly; a WAIT without
        one takes ``{}``. A run not waiting is left to ``resume`` (409)."""
        frames = run.cursor.get("frames") or []
        if run.status is not Status.WAITING or not frames:
            return
        wf = self.terminal.engine.registry.pinned(run)
        step = wf.steps.get(frames[-1][0])
        if not isinstance(step, WaitStep):
            return
        if step.input_schema is None:
            if data:
                field = scrub(next(iter(data)))
                message = f"{field}: step '{step.name}' takes no input; answer {{}}"
                raise ApiError(422, "unknown_field", message, field)
            return
        validated(wf.models[step.input_schema], data)

    def _health(self, body: bytes) -> tuple[int, dict[str, Any]]:
        return 200, self.terminal.health()


def _same_parameters(workflow: str, data: dict[str, Any], run: RunRecord) -> None:
    """409 if ``run``, found by the request's idempotency key, was started with other
    parameters than ``data`` (those fields named, never their values)."""
    stored = run.input
    differ = [
        k for k in (*data, *(k for k in stored if k not in data)) if data.get(k) != stored.get(k)
    ]
    if differ:
        names = ", ".join(differ)
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"this idempotency_key started a {workflow} with another {names}; "
            f"a retry sends the same parameters, a new {workflow} needs a new key",
            differ[0],
        )


class LocalApiServer(UnixHttpServer):
    """The local API on its Unix socket: ``LocalApiServer(path, terminal).start()``."""

    def __init__(self, path: Path, terminal: Terminal) -> None:
        self.terminal = terminal
        super().__init__(path, LocalApi(terminal).handle)
