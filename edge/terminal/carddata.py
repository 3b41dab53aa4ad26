"""Card-data protection on the terminal (invariant 6).

What a card reader hands over lives in memory only, wrapped so it cannot leak by accident:

* ``Sensitive`` holds a secret (clear PAN, CVV, track data, PIN block). Its repr, str and
  format are ``<redacted>``; it refuses JSON, pickling and pydantic JSON serialisation.
  ``reveal()`` is the one way to read it.
* ``CardRead`` is a reader's result. A model holding ``Sensitive`` fields cannot be
  dumped to JSON, so it cannot reach workflow state, the database or the outbox.
* ``ProtectedCard`` is what may be stored: the PAN encrypted with AES-GCM
  (``pan_token``), a keyed hash of it for velocity and hot-list checks (``pan_hash``),
  and its first-6/last-4. CVV, track data and PIN blocks have no field: they are dropped.
* ``DataKey`` is the terminal's card-data key: 32 random bytes in
  ``<data dir>/card-data.key`` (mode 0600), or given at provisioning. Two subkeys are
  derived from it with HKDF, one for AES-GCM and one for the HMAC, so no key serves two
  algorithms.
* ``scrub`` and ``RedactingFilter`` mask PANs in free text and log records, as a last
  line of defence for what slipped past the types.

Errors::

    TillflowError
    └── CardDataError           card data could not be protected or recovered
        ├── PanInvalid          not a PAN: 12-19 digits (the value is never echoed)
        ├── CardKeyError        the key file is unsafe, the wrong size, or unwritable
        └── CardTokenError      a pan_token is malformed, altered, or from another key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn, SupportsIndex

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from edge.errors import TillflowError
from edge.terminal.files import write_durably

if TYPE_CHECKING:  # cryptography is imported by the first card a DataKey protects
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_FILE_NAME",
    "TEST_CARDS",
    "CardDataError",
    "CardKeyError",
    "CardRead",
    "CardTokenError",
    "DataKey",
    "PanInvalid",
    "ProtectedCard",
    "RedactingFilter",
    "Sensitive",
    "luhn_valid",
    "mask_pan",
    "scrub",
]

KEY_FILE_NAME = "card-data.key"
KEY_BYTES = 32  # AES-256 and a 256-bit HMAC key, both derived from these
_NONCE_BYTES = 12  # AES-GCM's standard nonce; random nonces are safe far past a terminal's volume
_TAG_BYTES = 16
_TOKEN_PREFIX = "v1:"
_REDACTED = "<redacted>"

_SEPARATORS = re.compile(r"[ -]")
_PAN_SHAPE = re.compile(r"[0-9]{12,19}")
_EXPIRY_SHAPE = r"^[0-9]{2}(0[1-9]|1[0-2])$"

#: Public test numbers only (card schemes' and PSPs' documented test PANs): name -> (pan, YYMM).
TEST_CARDS: dict[str, tuple[str, str]] = {
    "visa": ("4111111111111111", "3912"),
    "mastercard": ("5555555555554444", "3912"),
    "amex": ("378282246310005", "3912"),
    "expired": ("4012888888881881", "2001"),  # January 2020
    "bad_luhn": ("4111111111111112", "3912"),
    "hot_listed": ("4000056655665556", "3912"),
}


# --- errors --------------------------------------------------------------------------------


class CardDataError(TillflowError):
    code = "card_data_error"


class PanInvalid(CardDataError):
    code = "pan_invalid"


class CardKeyError(CardDataError):
    code = "card_key_unusable"


class CardTokenError(CardDataError):
    code = "card_token_invalid"


# --- PAN helpers ---------------------------------------------------------------------------


def _pan_digits(pan: str) -> str:
    """The PAN's digits, separators (spaces, dashes) removed; raises PanInvalid."""
    digits = _SEPARATORS.sub("", pan) if isinstance(pan, str) else ""
    if not _PAN_SHAPE.fullmatch(digits):
        # Never echo the value: it may be a real card number with a typo.
        raise PanInvalid(
            f"not a card number: expected 12-19 digits, got {len(digits)} characters",
            hint="pass the PAN as digits, optionally grouped by spaces or dashes",
        )
    return digits


def mask_pan(pan: str) -> str:
    """First six and last four digits, the rest as ``*``: ``411111******1111``."""
    digits = _pan_digits(pan)
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def luhn_valid(pan: str) -> bool:
    """Whether ``pan`` (digits, optionally grouped by spaces or dashes) passes the Luhn
    check. Anything that is not digits is simply not valid."""
    digits = _SEPARATORS.sub("", pan)
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# A PAN in free text: a bare run of 13-19 digits, or one grouped the way people write
# them (4-4-4-4[-3] or Amex 4-6-5, one separator throughout). Longer digit runs are not
# cut into pieces: they are identifiers, not PANs.
_PAN_IN_TEXT = re.compile(
    r"(?<![0-9])(?:"
    r"[0-9]{13,19}"
    r"|[0-9]{4}(?P<g>[ -])[0-9]{4}(?P=g)[0-9]{4}(?P=g)[0-9]{1,4}(?:(?P=g)[0-9]{1,3})?"
    r"|[0-9]{4}(?P<a>[ -])[0-9]{6}(?P=a)[0-9]{5}"
    r")(?![0-9])"
)


def _mask_match(m: re.Match[str]) -> str:
    digits = _SEPARATORS.sub("", m.group())
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return mask_pan(digits)
    return m.group()


def scrub(text: str) -> str:
    """``text`` with every Luhn-valid 13-19 digit run (bare or grouped) masked.

    Digit runs that fail Luhn (order numbers, amounts, timestamps) are left alone."""
    return _PAN_IN_TEXT.sub(_mask_match, text)


# --- Sensitive -----------------------------------------------------------------------------


def _refuse_to_serialize(value: Sensitive) -> NoReturn:
    raise TypeError(
        "a Sensitive value (PAN, CVV, track data, PIN block) cannot be serialised; "
        "store a ProtectedCard (DataKey.protect) instead"
    )


def _to_sensitive(value: object) -> Sensitive:
    if isinstance(value, Sensitive):
        return value
    if isinstance(value, str):
        # Accepting a bare str means a validation error never has to quote it.
        return Sensitive(value)
    raise ValueError(f"expected Sensitive or str, got {type(value).__name__}")


class Sensitive:
    """A secret string that does not show itself: repr, str and format are
    ``<redacted>``; JSON, pickle and pydantic JSON dumps raise. Use ``reveal()``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Sensitive wraps a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return _REDACTED

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, format_spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sensitive):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Sensitive, self._value))

    # Pickle is a way to persist; refuse it. Copies stay in memory, and the value is
    # immutable, so a copy is the object itself.
    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("a Sensitive value cannot be pickled")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Sensitive value cannot be pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Sensitive value cannot be pickled")

    def __copy__(self) -> Sensitive:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Sensitive:
        return self

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _to_sensitive,
            # Python-mode dumps keep the (redacted) object; JSON dumps raise.
            serialization=core_schema.plain_serializer_function_ser_schema(
                _refuse_to_serialize, when_used="json"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "password", "writeOnly": True}


# --- models --------------------------------------------------------------------------------


class CardRead(BaseModel):
    """What a card reader returns. Memory only: ``model_dump(mode="json")`` raises.

    Only the shape is checked here (a PAN is 12-19 digits, expiry is YYMM); whether the
    card is acceptable (Luhn, expiry date, hot list) is the runtime's decision."""

    # hide_input_in_errors: a ValidationError must never quote what the reader read.
    # defer_build: validators built at the first card, not when the idle daemon imports this.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, hide_input_in_errors=True, defer_build=True
    )

    pan: Sensitive
    expiry: str = Field(pattern=_EXPIRY_SHAPE)
    cvv: Sensitive | None = None
    track2: Sensitive | None = None
    pin_block: Sensitive | None = None
    entry_mode: Literal["chip", "contactless", "swipe", "manual"] = "chip"

    @field_validator("pan")
    @classmethod
    def _pan_is_digits(cls, pan: Sensitive) -> Sensitive:
        if not _PAN_SHAPE.fullmatch(pan.reveal()):
            raise ValueError("pan must be 12-19 digits")
        return pan

    @field_validator("cvv")
    @classmethod
    def _cvv_is_digits(cls, cvv: Sensitive | None) -> Sensitive | None:
        if cvv is not None and not re.fullmatch(r"[0-9]{3,4}", cvv.reveal()):
            raise ValueError("cvv must be 3 or 4 digits")
        return cvv

    @property
    def bin6(self) -> str:
        return self.pan.reveal()[:6]

    @property
    def last4(self) -> str:
        return self.pan.reveal()[-4:]

    @property
    def masked(self) -> str:
        return mask_pan(self.pan.reveal())

    def expired(self, year: int, month: int) -> bool:
        """Whether the card is past its expiry at (``year``, ``month``), ``year`` in full
        (2031). A card is good through the last day of its expiry month."""
        if year < 2000 or not 1 <= month <= 12:
            raise ValueError(f"expected a full year and a month 1-12, got {year}-{month}")
        return (year, month) > (2000 + int(self.expiry[:2]), int(self.expiry[2:]))


class ProtectedCard(BaseModel):
    """What may be stored: the PAN only as an AES-GCM token and a keyed hash."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)

    pan_token: str = Field(pattern=r"^v1:[A-Za-z0-9_-]+=*$")
    pan_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    masked: str = Field(pattern=r"^[0-9]{6}\*{2,9}[0-9]{4}$")
    bin6: str = Field(pattern=r"^[0-9]{6}$")
    last4: str = Field(pattern=r"^[0-9]{4}$")
    expiry: str = Field(pattern=_EXPIRY_SHAPE)
    entry_mode: str

    @model_validator(mode="after")
    def _masked_agrees_with_bin_and_last4(self) -> ProtectedCard:
        if not (self.masked.startswith(self.bin6) and self.masked.endswith(self.last4)):
            raise ValueError("masked must start with bin6 and end with last4")
        return self


# --- the data key --------------------------------------------------------------------------


def _derive(key: bytes, purpose: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = f"tillflow/card-data/{purpose}/v1".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


class _Subkeys(NamedTuple):
    key_id: str
    aead: AESGCM
    hash_key: bytes
    aad: bytes


class DataKey:
    """The terminal's card-data key: encrypts PANs, hashes them, names itself by
    ``key_id`` (a fingerprint derived from the key, safe to log).

    The subkeys are derived at the first use, not when the key is loaded: that imports
    cryptography (~7 MB of RSS), which a terminal without a card to protect yet (the
    idle daemon) does not need. The key itself is checked at once; it is dropped once
    the subkeys are derived."""

    __slots__ = ("_key", "_subkeys_made")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            size = len(key) if isinstance(key, bytes) else type(key).__name__
            raise CardKeyError(
                f"a card-data key is exactly {KEY_BYTES} bytes, got {size}",
                hint="provision 32 random bytes (e.g. os.urandom(32))",
            )
        self._key = key
        self._subkeys_made: _Subkeys | None = None

    def _subkeys(self) -> _Subkeys:
        made = self._subkeys_made
        if made is None:  # two threads may both derive: the same values, either wins
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            key_id = _derive(self._key, "key-id")[:8].hex()
            made = _Subkeys(
                key_id,
                AESGCM(_derive(self._key, "pan-encryption")),
                _derive(self._key, "pan-hash"),
                # Binds every token to this key's id: meaningful under one key only.
                f"tillflow/card-data/pan/v1:{key_id}".encode(),
            )
            self._subkeys_made = made
            self._key = b""
        return made

    @property
    def key_id(self) -> str:
        return self._subkeys().key_id

    @classmethod
    def from_bytes(cls, key: bytes) -> DataKey:
        """The key given at provisioning."""
        return cls(key)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DataKey:
        """The key in ``data_dir/card-data.key``, created (32 random bytes, mode 0600)
        if there is none. A key file others can access, or of the wrong size, is refused."""
        path = Path(data_dir) / KEY_FILE_NAME
        try:
            return cls(_read_key_file(path))
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(KEY_BYTES)
        if _publish_key_file(path, key):
            return cls(key)
        return cls(_read_key_file(path))  # another process created it first: use theirs

    def encrypt_pan(self, pan: str) -> str:
        """``v1:`` + urlsafe-base64(nonce || ciphertext+tag); a fresh nonce every call."""
        digits = _pan_digits(pan)
        nonce = os.urandom(_NONCE_BYTES)
        k = self._subkeys()
        sealed = k.aead.encrypt(nonce, digits.encode("ascii"), k.aad)
        return _TOKEN_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt_pan(self, token: str) -> str:
        if not isinstance(token, str) or not token.startswith(_TOKEN_PREFIX):
            raise CardTokenError(
                "not a card token: it should start with 'v1:'",
                hint="pass ProtectedCard.pan_token as stored",
            )
        try:
            raw = base64.b64decode(token[len(_TOKEN_PREFIX) :], altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CardTokenError(
                "card token is not valid base64", hint="the stored token is damaged"
            ) from exc
        if len(raw) < _NONCE_BYTES + _TAG_BYTES + 1:
            raise CardTokenError(
                f"card token is too short ({len(raw)} bytes)", hint="the stored token is damaged"
            )
        from cryptography.exceptions import InvalidTag

        k = self._subkeys()
        try:
            clear = k.aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], k.aad)
        except InvalidTag as exc:
            raise CardTokenError(
                f"card token does not decrypt under key {self.key_id}",
                hint="it was made under another card-data key, or it has been altered",
            ) from exc
        return clear.decode("ascii")

    def pan_hash(self, pan: str) -> str:
        """HMAC-SHA256 of the PAN's digits under a subkey of this key, hex. Stable for one
        key, so it can match hot lists and count velocity; useless without the key."""
        digits = _pan_digits(pan)
        return hmac.new(
            self._subkeys().hash_key, digits.encode("ascii"), hashlib.sha256
        ).hexdigest()

    def protect(self, card: CardRead) -> ProtectedCard:
        """What may be stored of ``card``. CVV, track data and PIN block are dropped."""
        pan = card.pan.reveal()
        return ProtectedCard(
            pan_token=self.encrypt_pan(pan),
            pan_hash=self.pan_hash(pan),
            masked=card.masked,
            bin6=card.bin6,
            last4=card.last4,
            expiry=card.expiry,
            entry_mode=card.entry_mode,
        )

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r})"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("a DataKey cannot be pickled")


def _read_key_file(path: Path) -> bytes:
    """The key bytes; FileNotFoundError if absent, CardKeyError if unsafe or damaged."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CardKeyError(
            f"cannot open card-data key file {path}: {exc.strerror}",
            hint="the terminal service must own the data directory and the key file",
        ) from exc
    try:
        st = os.fstat(fd)  # of the file opened, not whatever the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise CardKeyError(f"card-data key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise CardKeyError(
                f"card-data key file {path} is accessible to group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"run `chmod 600 {path}`; if anyone else may have read it, treat the "
                "key as leaked and re-provision the terminal",
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise CardKeyError(
            f"card-data key file {path} is {st.st_size} bytes; a card-data key is exactly "
            f"{KEY_BYTES}",
            hint="restore it from the provisioning backup; do not delete it while stored "
            "cards use it, they cannot be decrypted without it",
        )
    return data


def _publish_key_file(path: Path, key: bytes) -> bool:
    """Write ``key`` to ``path`` atomically with mode 0600. False if ``path`` appeared
    meanwhile (it is left as it is).

    The key goes to a temporary file first and is hard-linked into place, so a crash never
    leaves a short key file, and a concurrent creator's key is never replaced (an
    ``os.replace`` could swap out a key that already encrypted a card)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return write_durably(path, key, mode=0o600, exclusive=True)
    except OSError as exc:
        raise CardKeyError(
            f"cannot create card-data key file {path}: {exc.strerror}",
            hint="the data directory must exist or be creatable, and be writable by the "
            "terminal service, on a filesystem with hard links",
        ) from exc


# --- logging -------------------------------------------------------------------------------

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not break logging
        return f"<unprintable {type(value).__name__}>"


class RedactingFilter(logging.Filter):
    """Masks PANs in a record: its message merged with its args, its traceback and stack,
    and string or integer ``extra`` fields. Never drops a record.

    Attach it to handlers: a logger's filters do not see records from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad args: keep the text, drop the args rather than leak them
            message = _safe_str(record.msg) + " [log arguments could not be formatted]"
        record.msg = scrub(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
            # Formatters print exc_text when set; dropping exc_info keeps one that formats
            # the exception itself from printing the unscrubbed message.
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(vars(record).items()):
            if name in _RECORD_ATTRIBUTES:
                continue
            if isinstance(value, str):
                setattr(record, name, scrub(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                masked = scrub(str(value))
                if masked != str(value):
                    setattr(record, name, masked)
        return True
