"""Where the resolve_outcome steps find what they need (``cloud.outcomes.steps``): an
``OutcomeServices`` given, or one made of the cloud engine's usual services; a missing
piece is a retryable failure (the run waits, open and listed), never a lost outcome."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cloud.outcomes.acquirer import Lookup
from cloud.outcomes.steps import OutcomeServices, _services
from cloud.settings import CloudSettings
from cloud.sync.keys import load_or_create_key
from edge.errors import StepError
from sync import signing

KEY = signing.load_private(bytes(range(32)))


class FakeLookup:
    def lookup(self, key: str) -> Lookup:
        return Lookup(key=key, found=False)


class FakePool:
    def connection(self) -> Any:
        raise AssertionError("not called here")


def _ctx(services: Any) -> Any:
    return SimpleNamespace(services=services)


def test_outcome_services_given__directly_as_an_attribute_or_in_a_mapping() -> None:
    given = OutcomeServices(connect=FakePool().connection, acquirer=FakeLookup(), signing_key=KEY)
    assert _services(_ctx(given)) is given
    assert _services(_ctx(SimpleNamespace(outcomes=given))) is given
    assert _services(_ctx({"outcomes": given})) is given


def test_made_of_the_cloud_engines_services() -> None:
    pool, lookup = FakePool(), FakeLookup()
    made = _services(_ctx({"pool": pool, "acquirer_lookup": lookup, "signing_key": KEY}))
    assert (made.acquirer, made.signing_key) == (lookup, KEY)


def test_the_key_file_of_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "cp.key"
    key, _ = load_or_create_key(path)
    settings = CloudSettings(signing_key_file=path, database_url="postgresql://x@127.0.0.1/db")
    made = _services(_ctx(SimpleNamespace(settings=settings, acquirer_lookup=FakeLookup())))
    assert signing.public_text(made.signing_key) == signing.public_text(key)


@pytest.mark.parametrize(
    "services",
    [None, {}, {"pool": FakePool(), "signing_key": KEY}, {"acquirer_lookup": FakeLookup()}],
)
def test_a_missing_piece__is_a_retryable_failure(services: Any) -> None:
    with pytest.raises(StepError) as err:
        _services(_ctx(services))
    assert err.value.retryable
