"""The sync service's HTTP app (cloud.api) in process, over the in-memory backend: the
routes, deny by default, bad input as 4xx in the error shape, a backend fault as a 503
with Retry-After; and the pieces of `tillflow cloud` that need no database (the entry
point, document files, the signing key file)."""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest
from sync_memory import MemoryBackend, Terminal, outbox_entry

import edge.cli
from cloud.api import create_app
from cloud.cli import _document
from cloud.sync.keys import load_key, load_or_create_key
from edge.engine.clock import SystemClock
from edge.errors import ConfigError
from sync import signing, wire
from sync.server import SyncService

starlette_testclient = pytest.importorskip("starlette.testclient")


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def service(backend: MemoryBackend) -> SyncService:
    return SyncService(backend, SystemClock(), signing.new_key())


@pytest.fixture
def client(service: SyncService) -> Iterator[Any]:
    closed: list[bool] = []
    app = create_app(service, close=lambda: closed.append(True))
    with starlette_testclient.TestClient(app, raise_server_exceptions=False) as c:
        yield c
    assert closed == [True]  # the backend is closed when the server stops


@pytest.fixture
def term(service: SyncService, client: Any) -> Terminal:
    term = Terminal(service.clock)
    token = service.create_enroll_token("s1").token
    answer = client.post("/v1/enroll", **term.enroll_request(token))
    assert answer.status_code == 200, answer.text
    term.device_id = answer.json()["device_id"]
    return term


def post_sync(client: Any, term: Terminal, request: Any, **headers: str) -> Any:
    _, path, signed, body = term.signed(request)
    return client.post(path, content=body, headers=signed | headers)


def test_api__sync_through_http_with_gzip_and_signature(client, term):
    answer = post_sync(client, term, term.request([outbox_entry(1)], term.grow_audit(2)))
    assert answer.status_code == 200, answer.text
    body = wire.decode(answer.content, wire.SyncResponse)
    assert (body.outbox_through, body.audit_through) == (1, 2)
    health = client.get("/v1/health").json()
    assert health == {"ok": True, "schema_versions": {"sync": 1}, "protocol_versions": [1]}


def test_api__rotate_key_route(client, term, backend):
    new = signing.new_key()
    new_public = signing.public_text(new)
    proof = wire.b64e(new.sign(signing.rotation_bytes(term.device_id, new_public)))
    request = wire.encode(
        wire.RotateKeyRequest(protocol_version=1, new_public_key=new_public, proof=proof)
    )
    _, _, headers, body = term.signed(request, "/v1/rotate-key", gzipped=False)
    answer = client.post("/v1/rotate-key", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert backend.state.devices[term.device_id].public_key == new_public


def test_api__anything_else_is_a_4xx_in_the_error_shape(client, term):
    good = json.dumps(term.request()).encode()
    answers = {
        "no route": client.get("/v1/devices"),
        "no docs": client.get("/docs"),
        "no openapi": client.get("/openapi.json"),
        "wrong method": client.put("/v1/sync", content=b"{}"),
        "unsigned": client.post("/v1/sync", content=good),
        "too big": client.post("/v1/sync", content=b"x" * (wire.MAX_BATCH_BYTES + 1)),
        "enroll too big": client.post("/v1/enroll", content=b"x" * 100_000),
        "not json": post_sync(client, term, b"\x00\x01"),
        "zstd": client.post(
            "/v1/sync",
            content=good,
            headers=term.sign(good, gzipped=False) | {"content-encoding": "zstd"},
        ),
    }
    for name, answer in answers.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        assert set(answer.json()["error"]) == {"code", "message", "field"}, name
    assert answers["no route"].status_code == 404
    assert answers["wrong method"].status_code == 405
    assert answers["too big"].json()["error"]["code"] == "body_too_large"
    assert answers["zstd"].status_code == 415
    # the bytes decide, not the label: a good body sent as text/plain is still taken
    labelled = post_sync(client, term, good, **{"content-type": "text/plain"})
    assert labelled.status_code == 200


def test_api__a_backend_fault_is_503_with_retry_after(client, term, backend):
    backend.fail_on = "insert_messages"
    answer = post_sync(client, term, term.request([outbox_entry(1)]))
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "unavailable"
    assert int(answer.headers["retry-after"]) >= 1
    assert post_sync(client, term, term.request([outbox_entry(1)])).status_code == 200


def test_api__an_unexpected_error_is_a_logged_500(client, term, backend, caplog):
    backend.state.devices = _Exploding(backend.state.devices)  # type: ignore[assignment]
    answer = post_sync(client, term, gzip.decompress(term.signed(term.request())[3]))
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal"
    assert "unexpected error serving POST /v1/sync" in caplog.text


class _Exploding(dict[str, Any]):
    def get(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug in the backend")

    def __deepcopy__(self, memo: Any) -> _Exploding:
        return self


# --- the CLI's pieces ----------------------------------------------------------------------


def test_cli__cloud_is_mounted_by_entry_point_and_a_missing_extra_leaves_it_out(monkeypatch):
    sub = _subcommands(edge.cli._parser())
    assert "cloud" in sub

    class Broken:
        name = "cloud"

        def load(self) -> Any:
            raise ImportError("No module named 'psycopg'")

    # edge.cli imports entry_points where the commands are mounted (not at import)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Broken()])
    assert "cloud" not in _subcommands(edge.cli._parser())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, Any]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_cli__a_document_file_is_its_content_or_kind_version_content(tmp_path):
    plain = tmp_path / "c.yaml"
    plain.write_text("offline_limit_minor: 5000\n")
    assert _document(plain, None).content == {"offline_limit_minor": 5000}
    full = tmp_path / "p.json"
    full.write_text(json.dumps({"kind": "policy", "version": 4, "content": {"rules": []}}))
    doc = _document(full, None)
    assert (doc.kind, doc.version, doc.content) == ("policy", 4, {"rules": []})
    with pytest.raises(ConfigError, match="--version says 5"):
        _document(full, 5)
    bad = tmp_path / "b.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        _document(bad, None)
    with pytest.raises(ConfigError, match="cannot read"):
        _document(tmp_path / "missing.yaml", None)


def test_keys__created_once_mode_0600_and_an_unsafe_or_short_file_is_refused(tmp_path):
    path = tmp_path / "dir" / "cp.key"
    key, made = load_or_create_key(path)
    assert made and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, made = load_or_create_key(path)
    assert not made and signing.public_text(again) == signing.public_text(key)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="accessible to group or others"):
        load_key(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="5 bytes, not 32"):
        load_key(path)
    with pytest.raises(ConfigError, match="no control-plane signing key"):
        load_key(tmp_path / "nope.key")
