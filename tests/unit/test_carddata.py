"""Card data on the terminal (invariant 6): what may be kept, and what never shows.

Only public test card numbers appear here (``TEST_CARDS`` and the schemes' documented
test PANs).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import os
import pickle
import sqlite3
import stat
import threading

import pytest
from carddata_scan import Finding, card_secrets, database_secrets, describe, scan, sqlite_files
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

import edge.terminal.carddata as carddata
from edge.errors import TillflowError
from edge.terminal.carddata import (
    KEY_FILE_NAME,
    TEST_CARDS,
    CardDataError,
    CardKeyError,
    CardRead,
    CardTokenError,
    DataKey,
    PanInvalid,
    ProtectedCard,
    RedactingFilter,
    Sensitive,
    luhn_valid,
    mask_pan,
    scrub,
)

VISA, VISA_EXPIRY = TEST_CARDS["visa"]
AMEX, _ = TEST_CARDS["amex"]
CVV = "737"
TRACK2 = f";{VISA}=39121010000012300000?"
PIN_BLOCK = "0412AC89ABCDEF12"

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def card(name: str = "visa", **overrides: object) -> CardRead:
    pan, expiry = TEST_CARDS[name]
    fields: dict[str, object] = {
        "pan": Sensitive(pan),
        "expiry": expiry,
        "cvv": Sensitive(CVV),
        "track2": Sensitive(TRACK2),
        "pin_block": Sensitive(PIN_BLOCK),
        "entry_mode": "swipe",
    }
    fields.update(overrides)
    return CardRead(**fields)  # type: ignore[arg-type]


def luhn_check_digit(payload: str) -> str:
    """Written out independently of the module: double every second digit from the right
    of the full number, i.e. every first, third... digit from the right of the payload."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def flip_byte(token: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token[3:]))
    raw[index] ^= 0x01
    return "v1:" + base64.urlsafe_b64encode(bytes(raw)).decode()


# --- the public surface ----------------------------------------------------------------------


def test_carddata_all__is_exactly_the_pinned_sorted_list():
    assert carddata.__all__ == [
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


def test_errors__derive_from_the_root_with_distinct_stable_codes():
    codes = {
        CardDataError: "card_data_error",
        PanInvalid: "pan_invalid",
        CardKeyError: "card_key_unusable",
        CardTokenError: "card_token_invalid",
    }
    for cls, code in codes.items():
        assert issubclass(cls, TillflowError)
        assert cls is CardDataError or issubclass(cls, CardDataError)
        assert cls.code == code
        assert cls("x").retryable is False


def test_test_cards__are_the_public_test_numbers_with_the_intended_luhn_and_expiry():
    assert {name: pan for name, (pan, _) in TEST_CARDS.items()} == {
        "visa": "4111111111111111",
        "mastercard": "5555555555554444",
        "amex": "378282246310005",
        "expired": "4012888888881881",
        "bad_luhn": "4111111111111112",
        "hot_listed": "4000056655665556",
    }
    for name, (pan, _) in TEST_CARDS.items():
        assert luhn_valid(pan) is (name != "bad_luhn"), name
    assert card("expired").expired(2026, 1)
    assert not any(card(n).expired(2026, 1) for n in TEST_CARDS if n != "expired")


# --- Sensitive -------------------------------------------------------------------------------


def test_sensitive__repr_str_and_fstrings_show_redacted_never_the_value():
    secret = Sensitive(VISA)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>30}",
        format(secret, ""),
    ]
    assert all(VISA not in s for s in shown)
    assert set(s.strip() for s in shown) == {"<redacted>"}
    assert secret.reveal() == VISA


def test_sensitive__logged_directly_or_inside_a_card_shows_redacted(caplog):
    read = card()
    log = logging.getLogger("tillflow.test.carddata")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        log.info("pan %s cvv %s", read.pan, read.cvv)
        log.info("read %r", read)
        log.info("track %s pin %s", read.track2, read.pin_block)
    assert caplog.records
    for secret in (VISA, CVV, TRACK2, PIN_BLOCK):
        assert secret not in caplog.text
    assert "<redacted>" in caplog.text


def test_sensitive__json_dumps_raises_type_error():
    with pytest.raises(TypeError):
        json.dumps(Sensitive(CVV))
    with pytest.raises(TypeError):
        json.dumps({"pan": Sensitive(VISA)})


@pytest.mark.parametrize("obj", [Sensitive(VISA), card()], ids=["sensitive", "card_read"])
def test_sensitive__pickling_raises_type_error_even_inside_a_model(obj):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(obj, protocol=protocol)


def test_sensitive__copies_stay_in_memory_and_compare_by_value():
    secret = Sensitive(CVV)
    assert copy.copy(secret) is secret
    assert copy.deepcopy(card()) == card()
    assert Sensitive(CVV) == Sensitive(CVV)
    assert Sensitive(CVV) != Sensitive("738")
    assert Sensitive(CVV) != CVV  # a wrapper never equals the bare secret


def test_sensitive__wraps_only_a_str():
    with pytest.raises(TypeError):
        Sensitive(4111111111111111)  # type: ignore[arg-type]


def test_sensitive__as_a_field_of_any_model_refuses_json_dumps():
    class Holder(BaseModel):
        secret: Sensitive

    held = Holder(secret=Sensitive(CVV))
    with pytest.raises(PydanticSerializationError):
        held.model_dump(mode="json")
    with pytest.raises(PydanticSerializationError):
        held.model_dump_json()
    assert held.model_dump()["secret"] == Sensitive(CVV)  # python mode keeps the wrapper


# --- CardRead --------------------------------------------------------------------------------


def test_card_read__json_dump_raises_so_it_cannot_be_persisted():
    read = card()
    with pytest.raises(PydanticSerializationError) as excinfo:
        read.model_dump(mode="json")
    assert VISA not in str(excinfo.value)
    with pytest.raises(PydanticSerializationError):
        read.model_dump_json()
    with pytest.raises(PydanticSerializationError):
        CardRead(pan=Sensitive(VISA), expiry=VISA_EXPIRY).model_dump_json()


def test_card_read__repr_shows_no_secret():
    text = repr(card()) + str(card())
    for secret in (VISA, CVV, TRACK2, PIN_BLOCK):
        assert secret not in text


@pytest.mark.parametrize(
    ("name", "bin6", "last4", "masked"),
    [
        ("visa", "411111", "1111", "411111******1111"),
        ("mastercard", "555555", "4444", "555555******4444"),
        ("amex", "378282", "0005", "378282*****0005"),
    ],
)
def test_card_read__bin6_last4_and_masked(name, bin6, last4, masked):
    read = card(name)
    assert (read.bin6, read.last4, read.masked) == (bin6, last4, masked)


def test_card_read__is_good_through_the_last_day_of_its_expiry_month():
    read = card(expiry="2812")
    assert not read.expired(2028, 11)
    assert not read.expired(2028, 12)
    assert read.expired(2029, 1)
    assert not read.expired(2027, 12)
    with pytest.raises(ValueError):
        read.expired(28, 12)  # a two-digit year is a mistake, not 0028


def test_card_read__keeps_a_bad_luhn_pan_for_the_runtime_to_decline():
    read = card("bad_luhn")
    assert not luhn_valid(read.pan.reveal())


@pytest.mark.parametrize(
    "overrides",
    [
        {"pan": Sensitive("4111-1111-1111-1111")},
        {"pan": Sensitive("41111")},
        {"pan": 4111111111111111},
        {"cvv": Sensitive("73a")},
        {"expiry": "2813"},
        {"entry_mode": "magic"},
        {"pan_token": "v1:x"},
    ],
    ids=["separators", "short", "int", "cvv", "expiry", "entry_mode", "extra_field"],
)
def test_card_read__invalid_input_is_refused_without_quoting_it(overrides):
    with pytest.raises(ValidationError) as excinfo:
        card(**overrides)
    assert "4111" not in str(excinfo.value)
    assert "73a" not in str(excinfo.value)


def test_card_read__accepts_a_bare_str_and_wraps_it():
    read = CardRead(pan=VISA, expiry=VISA_EXPIRY)  # type: ignore[arg-type]
    assert isinstance(read.pan, Sensitive)
    assert read.pan.reveal() == VISA


# --- DataKey: encryption ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEST_CARDS))
def test_encrypt_pan__round_trips_every_test_card(name):
    pan, _ = TEST_CARDS[name]
    key = DataKey.from_bytes(KEY_A)
    token = key.encrypt_pan(pan)
    assert token.startswith("v1:")
    assert pan not in token
    assert key.decrypt_pan(token) == pan


def test_encrypt_pan__uses_a_fresh_nonce_every_time():
    key = DataKey.from_bytes(KEY_A)
    tokens = {key.encrypt_pan(VISA) for _ in range(20)}
    assert len(tokens) == 20
    nonces = {base64.urlsafe_b64decode(t[3:])[:12] for t in tokens}
    assert len(nonces) == 20
    assert {key.decrypt_pan(t) for t in tokens} == {VISA}


def test_encrypt_pan__token_is_nonce_ciphertext_and_tag_in_urlsafe_base64():
    token = DataKey.from_bytes(KEY_A).encrypt_pan(VISA)
    raw = base64.urlsafe_b64decode(token[3:])
    assert len(raw) == 12 + len(VISA) + 16
    assert set(token[3:]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="
    )


@pytest.mark.parametrize("index", [0, 11, 12, 20, -16, -1], ids=lambda i: f"byte{i}")
def test_decrypt_pan__a_flipped_byte_anywhere_is_refused(index):
    key = DataKey.from_bytes(KEY_A)
    with pytest.raises(CardTokenError) as excinfo:
        key.decrypt_pan(flip_byte(key.encrypt_pan(VISA), index))
    assert excinfo.value.code == "card_token_invalid"


@pytest.mark.parametrize(
    "token",
    ["", "4111111111111111", "v2:AAAA", "v1:not base64!", "v1:AAAA", "v1:" + "A" * 40 + "=="],
    ids=["empty", "clear_pan", "version", "alphabet", "short", "garbage"],
)
def test_decrypt_pan__a_malformed_token_is_a_card_data_error(token):
    with pytest.raises(CardDataError) as excinfo:
        DataKey.from_bytes(KEY_A).decrypt_pan(token)
    assert VISA not in str(excinfo.value)


def test_decrypt_pan__under_another_key_is_refused():
    token = DataKey.from_bytes(KEY_A).encrypt_pan(VISA)
    with pytest.raises(CardDataError, match="does not decrypt under key"):
        DataKey.from_bytes(KEY_B).decrypt_pan(token)


def test_encrypt_pan__refuses_what_is_not_a_pan_without_echoing_it():
    with pytest.raises(PanInvalid) as excinfo:
        DataKey.from_bytes(KEY_A).encrypt_pan("4111111111111111x")
    assert "4111" not in str(excinfo.value)


# --- DataKey: hashing, identity -----------------------------------------------------------


def test_pan_hash__is_stable_for_a_key_and_differs_across_keys():
    a1, a2, b = DataKey.from_bytes(KEY_A), DataKey.from_bytes(KEY_A), DataKey.from_bytes(KEY_B)
    assert a1.pan_hash(VISA) == a2.pan_hash(VISA)
    assert a1.pan_hash(VISA) != b.pan_hash(VISA)
    assert a1.pan_hash(VISA) != a1.pan_hash(AMEX)
    assert len(a1.pan_hash(VISA)) == 64
    int(a1.pan_hash(VISA), 16)


def test_pan_hash__is_not_a_plain_hash_of_the_pan():
    digest = DataKey.from_bytes(KEY_A).pan_hash(VISA)
    assert digest != hashlib.sha256(VISA.encode()).hexdigest()
    assert digest != hashlib.sha256(KEY_A + VISA.encode()).hexdigest()


def test_pan_hash__ignores_how_the_pan_was_grouped():
    key = DataKey.from_bytes(KEY_A)
    assert key.pan_hash("4111 1111 1111 1111") == key.pan_hash("4111-1111-1111-1111")
    assert key.pan_hash("4111 1111 1111 1111") == key.pan_hash(VISA)


def test_key_id__is_a_short_stable_fingerprint_that_reveals_no_key_bytes():
    a, b = DataKey.from_bytes(KEY_A), DataKey.from_bytes(KEY_B)
    assert a.key_id == DataKey.from_bytes(KEY_A).key_id != b.key_id
    assert 8 <= len(a.key_id) <= 32
    assert a.key_id not in KEY_A.hex()
    assert KEY_A.hex()[:8] not in repr(a)
    assert repr(a) == f"DataKey(key_id={a.key_id!r})"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_from_bytes__refuses_a_key_that_is_not_32_bytes(size):
    with pytest.raises(CardKeyError, match="exactly 32 bytes"):
        DataKey.from_bytes(os.urandom(size))


def test_data_key__cannot_be_pickled():
    with pytest.raises(TypeError):
        pickle.dumps(DataKey.from_bytes(KEY_A))


# --- protect -----------------------------------------------------------------------------------


def test_protect__keeps_only_token_hash_and_first6_last4():
    key = DataKey.from_bytes(KEY_A)
    protected = key.protect(card())
    assert set(ProtectedCard.model_fields) == {
        "pan_token",
        "pan_hash",
        "masked",
        "bin6",
        "last4",
        "expiry",
        "entry_mode",
    }
    assert (protected.masked, protected.bin6, protected.last4) == (
        "411111******1111",
        "411111",
        "1111",
    )
    assert (protected.expiry, protected.entry_mode) == (VISA_EXPIRY, "swipe")
    assert protected.pan_hash == key.pan_hash(VISA)
    assert key.decrypt_pan(protected.pan_token) == VISA


def test_protect__json_contains_no_clear_pan_cvv_track_or_pin_block():
    protected = DataKey.from_bytes(KEY_A).protect(card())
    text = protected.model_dump_json()
    for secret in (VISA, TRACK2, PIN_BLOCK, PIN_BLOCK.lower()):
        assert secret not in text
    # A 3-digit CVV could coincide with random token or hash characters, so look for it
    # in every field that is not random-looking.
    plain = protected.model_dump(exclude={"pan_token", "pan_hash"})
    assert all(CVV not in value for value in plain.values())
    assert "cvv" not in text and "track" not in text and "pin" not in text


def test_protect__cvv_track_and_pin_block_do_not_influence_what_is_stored():
    key = DataKey.from_bytes(KEY_A)
    full = key.protect(card()).model_dump(exclude={"pan_token"})
    bare = key.protect(card(cvv=None, track2=None, pin_block=None)).model_dump(
        exclude={"pan_token"}
    )
    assert full == bare


def test_protected_card__round_trips_through_json_and_refuses_extra_fields():
    protected = DataKey.from_bytes(KEY_A).protect(card("amex"))
    assert ProtectedCard.model_validate_json(protected.model_dump_json()) == protected
    with pytest.raises(ValidationError):
        ProtectedCard.model_validate({**protected.model_dump(), "cvv": CVV})


def test_protected_card__refuses_a_clear_pan_in_the_masked_field():
    fields = DataKey.from_bytes(KEY_A).protect(card()).model_dump()
    with pytest.raises(ValidationError):
        ProtectedCard.model_validate({**fields, "masked": VISA})


# --- the key file ------------------------------------------------------------------------------


def test_load_or_create__creates_a_32_byte_key_file_with_mode_0600(tmp_path):
    key = DataKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert key.key_id == DataKey.from_bytes(path.read_bytes()).key_id
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]  # no temp file left


def test_load_or_create__is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        DataKey.load_or_create(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600


def test_load_or_create__reuses_the_existing_key(tmp_path):
    first = DataKey.load_or_create(tmp_path)
    token = first.encrypt_pan(VISA)
    second = DataKey.load_or_create(tmp_path)
    assert second.key_id == first.key_id
    assert second.decrypt_pan(token) == VISA


def test_load_or_create__creates_a_missing_data_dir(tmp_path):
    DataKey.load_or_create(tmp_path / "data" / "terminal")
    assert (tmp_path / "data" / "terminal" / KEY_FILE_NAME).stat().st_size == 32


def test_load_or_create__concurrent_first_loads_agree_on_one_key(tmp_path):
    barrier = threading.Barrier(8)
    ids: list[str] = []

    def load() -> None:
        barrier.wait()
        ids.append(DataKey.load_or_create(tmp_path).key_id)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8
    assert set(ids) == {DataKey.load_or_create(tmp_path).key_id}
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_or_create__refuses_a_key_file_others_can_access(tmp_path, mode):
    DataKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    path.chmod(mode)
    with pytest.raises(CardKeyError) as excinfo:
        DataKey.load_or_create(tmp_path)
    assert f"{mode:04o}" in str(excinfo.value)
    assert f"chmod 600 {path}" in str(excinfo.value)
    assert path.read_bytes().hex() not in str(excinfo.value)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_load_or_create__refuses_a_key_file_of_the_wrong_size_and_keeps_it(tmp_path, size):
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"\x01" * size)
    path.chmod(0o600)
    with pytest.raises(CardKeyError, match=f"is {size} bytes.*exactly 32") as excinfo:
        DataKey.load_or_create(tmp_path)
    assert "restore it" in str(excinfo.value)
    assert path.read_bytes() == b"\x01" * size  # never silently replaced


def test_load_or_create__refuses_a_directory_in_place_of_the_key_file(tmp_path):
    (tmp_path / KEY_FILE_NAME).mkdir(mode=0o700)
    with pytest.raises(CardKeyError, match="not a regular file"):
        DataKey.load_or_create(tmp_path)


# --- Luhn and masking --------------------------------------------------------------------------


@given(st.text(alphabet="0123456789", min_size=1, max_size=24))
def test_luhn__a_payload_with_its_check_digit_is_valid(payload):
    assert luhn_valid(payload + luhn_check_digit(payload))


@given(
    st.text(alphabet="0123456789", min_size=1, max_size=24),
    st.data(),
)
def test_luhn__changing_any_one_digit_makes_it_invalid(payload, data):
    number = payload + luhn_check_digit(payload)
    i = data.draw(st.integers(0, len(number) - 1))
    other = data.draw(st.sampled_from([d for d in "0123456789" if d != number[i]]))
    assert not luhn_valid(number[:i] + other + number[i + 1 :])


@pytest.mark.parametrize(
    "text", ["", " ", "abcd", "4111111111111111x", "\uff14\uff11\uff11\uff11", "4111.1111"]
)
def test_luhn__what_is_not_digits_is_not_valid(text):
    assert not luhn_valid(text)


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        (VISA, "411111******1111"),
        (AMEX, "378282*****0005"),
        ("4222222222222", "422222***2222"),
        ("4111 1111 1111 1111", "411111******1111"),
        ("6011-0009-9013-9424", "601100******9424"),
    ],
)
def test_mask_pan__shows_first6_and_last4_only(pan, masked):
    assert mask_pan(pan) == masked


@pytest.mark.parametrize("pan", ["", "4111", "41111111111111111111", "4111abcd11111111"])
def test_mask_pan__refuses_what_is_not_a_pan(pan):
    with pytest.raises(PanInvalid):
        mask_pan(pan)


# --- scrub and the logging filter ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"declined {VISA} twice", "declined 411111******1111 twice"),
        ("card 4111 1111 1111 1111.", "card 411111******1111."),
        ("card 5555-5555-5555-4444", "card 555555******4444"),
        ("amex 3782 822463 10005", "amex 378282*****0005"),
        (f"pan={VISA};cvv", "pan=411111******1111;cvv"),
        (f"a{AMEX}b {VISA}", "a378282*****0005b 411111******1111"),
    ],
)
def test_scrub__masks_luhn_valid_pans_bare_or_grouped(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 4111111111111112 shipped",  # 16 digits, fails Luhn: an order number
        "ref 1234567890123",
        "at 2026-01-15 12:30:00 amount 1250",
        f"id 9{VISA}",  # a longer run is an identifier, not a PAN
        "masked 411111******1111",
    ],
)
def test_scrub__leaves_non_pan_digit_runs_alone(text):
    assert scrub(text) == text


@given(
    st.sampled_from([pan for name, (pan, _) in TEST_CARDS.items() if name != "bad_luhn"]),
    st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=20),
    st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=20),
)
def test_scrub__no_valid_test_pan_survives_between_non_digits(pan, before, after):
    out = scrub(before + pan + after)
    assert pan not in out
    assert mask_pan(pan) in out


@pytest.fixture
def redacted_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("tillflow.test.redacting")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True


def test_redacting_filter__masks_a_pan_passed_as_a_percent_s_arg(redacted_log):
    log, stream = redacted_log
    log.info("authorising %s for %d cents", VISA, 1250)
    assert stream.getvalue() == "INFO authorising 411111******1111 for 1250 cents\n"


def test_redacting_filter__masks_pans_in_int_args_extras_and_tracebacks(redacted_log):
    log, stream = redacted_log
    log.warning("pan %d", int(VISA))
    log.info("hot list hit", extra={"card": VISA, "number": int(AMEX)})
    try:
        raise RuntimeError(f"acquirer echoed {VISA}")
    except RuntimeError:
        log.exception("charge failed")
    out = stream.getvalue()
    assert VISA not in out and AMEX not in out
    assert "pan 411111******1111" in out
    assert "RuntimeError: acquirer echoed 411111******1111" in out


def test_redacting_filter__on_extra_fields_keeps_them_for_structured_formatters(redacted_log):
    log, _ = redacted_log
    seen: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.addFilter(RedactingFilter())
    capture.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(capture)
    try:
        log.info("hit", extra={"card": VISA, "number": int(AMEX), "count": 3})
    finally:
        log.removeHandler(capture)
    (record,) = seen
    assert (record.card, record.number, record.count) == ("411111******1111", "378282*****0005", 3)


def test_redacting_filter__unformattable_args_neither_raise_nor_leak(redacted_log):
    log, stream = redacted_log
    log.info("two %s %s", VISA)
    out = stream.getvalue()
    assert VISA not in out
    assert "could not be formatted" in out


# --- the byte scanner (tests/support/carddata_scan.py) ------------------------------------------


def test_scan__finds_a_pan_in_utf8_at_its_offset_and_reports_it_masked(tmp_path):
    log = tmp_path / "terminal.log"
    log.write_bytes(b"INFO charge " + VISA.encode() + b" ok\n")
    (finding,) = scan([log], {"pan": VISA})
    assert finding == Finding(log, 12, "pan 411111******1111", "utf-8")
    assert VISA not in str(finding) + repr(finding)


@pytest.mark.parametrize(
    ("written", "form"),
    [
        (VISA.encode("utf-16-le"), "utf-16-le"),
        (VISA.encode("utf-16-be"), "utf-16-be"),
        (b"4111 1111 1111 1111", "grouped ' ' utf-8"),
        (b"4111-1111-1111-1111", "grouped '-' utf-8"),
        ("4111 1111 1111 1111".encode("utf-16-le"), "grouped ' ' utf-16-le"),
        (int(VISA).to_bytes(8, "big"), "int64-be (SQLite integer)"),
        (int(VISA).to_bytes(8, "little"), "int64-le"),
        (bytes.fromhex(VISA), "packed BCD"),
    ],
    ids=["utf16le", "utf16be", "spaces", "dashes", "spaces_utf16", "int_be", "int_le", "bcd"],
)
def test_scan__finds_a_pan_in_every_form_it_may_be_written(tmp_path, written, form):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(
        b"\xaa" * 7 + written + b"\xff" * 5
    )  # no NUL: UTF-16-LE after a NUL is also UTF-16-BE
    assert scan([blob], {"pan": VISA}) == [Finding(blob, 7, "pan 411111******1111", form)]


def test_scan__finds_an_amex_grouped_4_6_5(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("card 3782 822463 10005\n")
    assert [f.form for f in scan([log], [AMEX])] == ["grouped ' ' utf-8"]


def test_scan__finds_every_occurrence_of_every_secret(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(f"{VISA}{VISA} cvv={CVV} track={TRACK2} pin={PIN_BLOCK.lower()}\n")
    found = [(f.offset, f.secret) for f in scan([log], card_secrets(card()))]
    pan = "pan 411111******1111"
    assert (0, pan) in found and (16, pan) in found
    assert (37, "cvv") in found
    assert any(s == "track2" for _, s in found)
    assert any(s == "pin_block" for _, s in found)


def test_scan__labels_plain_secrets_by_number_never_by_value(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(f"x{CVV}x")
    (finding,) = scan([log], [CVV])
    assert finding.secret == "secret #1"
    assert CVV not in describe([finding])


def test_scan__finds_a_pin_block_as_raw_bytes(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01" + bytes.fromhex(PIN_BLOCK))
    assert [(f.offset, f.form) for f in scan([blob], {"pin_block": PIN_BLOCK})] == [
        (2, "raw bytes of hex")
    ]


def test_scan__reports_nothing_for_masked_tokenised_or_unrelated_data(tmp_path):
    protected = DataKey.from_bytes(KEY_A).protect(card())
    log = tmp_path / "clean.log"
    log.write_text(
        f"charge 411111******1111 order 4111111111111112 {protected.model_dump_json()}\n"
    )
    assert scan([log], {k: v for k, v in card_secrets(card()).items() if k != "cvv"}) == []


def test_scan__reads_every_file_under_a_directory(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "old.log").write_text(f"x {VISA}")
    (tmp_path / "new.log").write_text("nothing here")
    assert [f.path.name for f in scan([tmp_path], [VISA])] == ["old.log"]


def test_scan__a_missing_path_or_empty_secret_is_an_error_not_a_pass(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan([tmp_path / "missing.db"], [VISA])
    (tmp_path / "a.log").write_text("x")
    with pytest.raises(ValueError):
        scan([tmp_path / "a.log"], [""])


def test_scan__finds_a_pan_in_a_sqlite_wal_and_stored_as_an_integer(tmp_path):
    db = tmp_path / "terminal.db"
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE leak (note TEXT, n INTEGER)")
        with conn:
            conn.execute("INSERT INTO leak VALUES (?, ?)", (f"pan {VISA}", VISA))
        files = sqlite_files(db)
        assert [p.name for p in files] == ["terminal.db", "terminal.db-wal", "terminal.db-shm"]
        found = {(f.path.name, f.form) for f in scan(files, {"pan": VISA})}
    finally:
        conn.close()
    assert ("terminal.db-wal", "utf-8") in found
    assert ("terminal.db-wal", "int64-be (SQLite integer)") in found  # INTEGER affinity


def test_scan__a_sqlite_database_holding_only_protected_cards_is_clean(tmp_path):
    db = tmp_path / "terminal.db"
    key = DataKey.from_bytes(KEY_A)
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE cards (body TEXT, masked TEXT)")
        with conn:
            for name in ("visa", "amex", "mastercard"):
                protected = key.protect(card(name))
                conn.execute(
                    "INSERT INTO cards VALUES (?, ?)",
                    (protected.model_dump_json(), protected.masked),
                )
        # Long secrets only: a 3-digit CVV may coincide with bytes of any real file.
        secrets = {"track2": TRACK2, "pin_block": PIN_BLOCK}
        for name in ("visa", "amex", "mastercard"):
            secrets[name] = TEST_CARDS[name][0]
        findings = scan(sqlite_files(db), secrets)
    finally:
        conn.close()
    assert findings == [], describe(findings)


def test_scan__a_database_scan_finds_a_stored_cvv_but_not_digits_inside_hex(tmp_path):
    from hwsim.card_reader import make_card

    secrets = database_secrets({"visa": make_card("visa", cvv="9731")})
    clean = tmp_path / "clean.db"
    clean.write_bytes(b"run 3fa9731c0d... hash 00ff9731ab, ts 1797310000")
    assert scan([clean], secrets) == []
    leaked = tmp_path / "leaked.db"
    leaked.write_bytes(b'{"amount":100,"cvv":"9731"}')
    assert {f.secret for f in scan([leaked], secrets)} == {"visa cvv", "cvv field"}
