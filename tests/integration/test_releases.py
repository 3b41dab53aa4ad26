"""Releases in the control plane (cloud.releases): a signed bundle uploaded through the
Fleet API is verified with the configured release key before anything is stored (a
forged, a corrupt, a non-bundle upload is a 422 naming why, and nothing is kept); two
releases sharing files keep one copy of each; a terminal fetches a release's signed file
list and its files by hash with its device signature, resuming with Range."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_app import Fleet
from hwsim.syncrig import Cloud

from cloud.api.serve import build_app, migrate_fleet
from cloud.fleet import tokens
from cloud.settings import CloudSettings
from cloud.sync.postgres import PostgresSyncBackend
from edge.terminal.service.release import generate_keypair, sign_bundle
from sync import signing

pytestmark = [pytest.mark.postgres]
pytest.importorskip("starlette.testclient")

#: A large file the two releases share (the "interpreter"), and one that differs.
SHARED = bytes(range(256)) * 4096  # 1 MiB


def bundle_dir(root: Path, version: str, key: Path, code: bytes) -> Path:
    """An unpacked bundle in make bundle's layout, signed with ``key``."""
    folder = root / f"tillflow-edge-{version}"
    (folder / "tillflow-edge" / "_internal").mkdir(parents=True)
    (folder / "VERSION").write_text(version + "\n")
    (folder / "install.sh").write_text("#!/bin/sh\nexit 0\n")
    (folder / "install.sh").chmod(0o755)
    (folder / "edge.yaml").write_text("device_id: T\n")
    exe = folder / "tillflow-edge" / "tillflow-edge"
    exe.write_bytes(b"\x7fELF" + code)
    exe.chmod(0o755)
    (folder / "tillflow-edge" / "_internal" / "libpython.so").write_bytes(SHARED)
    (folder / "tillflow-edge" / "_internal" / "base_library.zip").write_bytes(b"stdlib " + code)
    sign_bundle(folder, key)
    return folder


def tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted([folder, *folder.rglob("*")]):
            tar.add(path, arcname=path.relative_to(folder.parent).as_posix(), recursive=False)
    return gzip.compress(buf.getvalue(), mtime=0)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    generate_keypair(tmp_path / "ours" / "release.key", tmp_path / "ours" / "release.pub")
    generate_keypair(tmp_path / "theirs" / "release.key", tmp_path / "theirs" / "release.pub")
    return {
        "key": tmp_path / "ours" / "release.key",
        "pub": tmp_path / "ours" / "release.pub",
        "foreign": tmp_path / "theirs" / "release.key",
    }


@pytest.fixture
def fleet(new_database, keys) -> Iterator[Fleet]:
    """The Fleet API as serve builds it, configured with our release public key."""
    import starlette.testclient

    url = new_database()
    backend = PostgresSyncBackend(url, pool_size=4, pool_timeout_s=5.0)
    try:
        migrate_fleet(backend)
        settings = CloudSettings(database_url=url, release_pubkey_file=keys["pub"])
        app = build_app(settings, backend, signing.new_key())
        with starlette.testclient.TestClient(app, raise_server_exceptions=False) as client:
            f = Fleet(client, backend, url)
            for role in tokens.ROLES:
                f.tokens[role] = f.make_token(role)
            yield f
    finally:
        backend.close()


def upload(fleet: Fleet, data: bytes, role: str = "operator") -> Any:
    return fleet.post(
        "/api/v1/releases", role, content=data, headers={"content-type": "application/gzip"}
    )


def device_get(fleet: Fleet, term: Any, path: str, **headers: str) -> Any:
    signed = signing.sign_request(term.key, "GET", path, b"", term.device_id, time.time())
    return fleet.client.get(path, headers=signed | headers)


def counts(fleet: Fleet) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        fleet.sql(f"SELECT count(*) FROM {t}")[0][0]
        for t in ("releases", "release_files", "release_blobs")
    )


def test_releases__upload_list_show_and_one_blob_for_two_releases(fleet, keys, tmp_path):
    a = bundle_dir(tmp_path / "a", "1.0.0", keys["key"], b"release one")
    b = bundle_dir(tmp_path / "b", "1.1.0", keys["key"], b"release two")

    first = upload(fleet, tar_gz(a))
    assert first.status_code == 201, first.text
    r1 = first.json()
    sums = (a / "SHA256SUMS").read_bytes()
    assert r1["release"] == "1.0.0" and r1["created"] is True
    assert r1["manifest_sha256"] == hashlib.sha256(sums).hexdigest()
    assert r1["files"] == 6  # VERSION, install.sh, edge.yaml and the three of the binary
    assert r1["bytes"] == r1["new_bytes"] > len(SHARED)
    assert r1["uploaded_by"] == "operator-test"

    second = upload(fleet, tar_gz(b))
    assert second.status_code == 201, second.text
    r2 = second.json()
    # install.sh, edge.yaml and libpython.so are the same files: only the rest is new.
    same = len(SHARED) + len("#!/bin/sh\nexit 0\n") + len("device_id: T\n")
    assert r2["new_bytes"] == r2["bytes"] - same
    releases, files, blobs = counts(fleet)
    assert (releases, files) == (2, 12)
    assert blobs == 12 - 3  # one copy per distinct file
    shared = hashlib.sha256(SHARED).hexdigest()
    assert fleet.sql("SELECT count(*) FROM release_blobs WHERE sha256 = %s", (shared,)) == [(1,)]

    # The same bundle again: no error, nothing new.
    again = upload(fleet, tar_gz(a))
    assert again.status_code == 201 and again.json()["created"] is False
    assert counts(fleet) == (2, 12, 9)

    listed = fleet.get("/api/v1/releases", "read_only", params={"limit": 1})
    assert listed.status_code == 200, listed.text
    assert [r["release"] for r in listed.json()["items"]] == ["1.1.0"]
    rest = fleet.get("/api/v1/releases", "read_only", params={"after": listed.json()["next"]})
    assert [r["release"] for r in rest.json()["items"]] == ["1.0.0"]
    assert rest.json()["next"] is None

    shown = fleet.get("/api/v1/releases/1.0.0", "read_only").json()
    by_path = {f["path"]: f for f in shown["file_list"]}
    assert by_path["tillflow-edge/tillflow-edge"]["mode"] == 0o755
    assert by_path["edge.yaml"]["mode"] == 0o644
    assert by_path["tillflow-edge/_internal/libpython.so"]["sha256"] == shared
    missing = fleet.get("/api/v1/releases/9.9.9", "read_only")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "release_not_found"

    # The upload is in the cloud's audit log, once per release stored.
    logged = fleet.sql("SELECT target FROM cloud_audit WHERE action = 'release.upload'")
    assert sorted(r[0] for r in logged) == ["1.0.0", "1.1.0"]

    # read_only may not upload; a stranger learns nothing.
    assert upload(fleet, tar_gz(b), "read_only").status_code == 403
    assert fleet.client.post("/api/v1/releases", content=tar_gz(b)).status_code == 401


def test_releases__a_forged_or_corrupt_bundle_is_refused_and_nothing_is_kept(fleet, keys, tmp_path):
    # Signed with another key.
    forged = bundle_dir(tmp_path / "f", "2.0.0", keys["foreign"], b"forged")
    out = upload(fleet, tar_gz(forged))
    assert out.status_code == 422, out.text
    error = out.json()["error"]
    assert error["code"] == "invalid_bundle"
    assert "SHA256SUMS.sig does not verify" in error["message"]

    # Signed by us, then a file altered.
    altered = bundle_dir(tmp_path / "c", "2.0.1", keys["key"], b"good")
    (altered / "tillflow-edge" / "_internal" / "base_library.zip").write_bytes(b"evil")
    out = upload(fleet, tar_gz(altered))
    assert out.status_code == 422
    assert "base_library.zip does not match its SHA-256" in out.json()["error"]["message"]

    # A file the list does not name, slipped in.
    extra = bundle_dir(tmp_path / "e", "2.0.2", keys["key"], b"good")
    (extra / "tillflow-edge" / "payload.so").write_bytes(b"more")
    out = upload(fleet, tar_gz(extra))
    assert out.status_code == 422
    assert "files not in SHA256SUMS: tillflow-edge/payload.so" in out.json()["error"]["message"]

    # Not a bundle at all, and a truncated one.
    good = tar_gz(bundle_dir(tmp_path / "g", "2.0.3", keys["key"], b"good"))
    for body in (b"not a tar", good[: len(good) // 2]):
        out = upload(fleet, body)
        assert out.status_code == 422, out.text
        assert out.json()["error"]["code"] == "invalid_bundle"
    assert counts(fleet) == (0, 0, 0)

    # A release name held with other contents is a conflict, not a replacement.
    assert upload(fleet, good).status_code == 201
    other = tar_gz(bundle_dir(tmp_path / "h", "2.0.3", keys["key"], b"other"))
    out = upload(fleet, other)
    assert out.status_code == 409 and out.json()["error"]["code"] == "release_exists"
    assert counts(fleet)[0] == 1


def test_releases__a_terminal_fetches_the_manifest_and_files_by_hash_with_range(
    fleet, keys, tmp_path
):
    folder = bundle_dir(tmp_path / "a", "3.0.0", keys["key"], b"three")
    assert upload(fleet, tar_gz(folder)).status_code == 201
    term = fleet.enroll("store-1")

    got = device_get(fleet, term, "/v1/releases/3.0.0/manifest")
    assert got.status_code == 200, got.text
    m = got.json()
    sums = (folder / "SHA256SUMS").read_bytes()
    assert m["sums"].encode() == sums
    assert hashlib.sha256(m["sums"].encode()).hexdigest() == m["manifest_sha256"]
    assert base64.b64decode(m["signature"]) == (folder / "SHA256SUMS.sig").read_bytes()
    assert device_get(fleet, term, "/v1/releases/3.9.9/manifest").status_code == 404

    shared = hashlib.sha256(SHARED).hexdigest()
    whole = device_get(fleet, term, f"/v1/files/{shared}")
    assert whole.status_code == 200
    assert whole.content == SHARED and whole.headers["accept-ranges"] == "bytes"

    # An interrupted download resumes where it stopped.
    cut = 300_001
    rest = device_get(fleet, term, f"/v1/files/{shared}", range=f"bytes={cut}-")
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {cut}-{len(SHARED) - 1}/{len(SHARED)}"
    assert SHARED[:cut] + rest.content == SHARED
    middle = device_get(fleet, term, f"/v1/files/{shared}", range="bytes=10-19")
    assert middle.status_code == 206 and middle.content == SHARED[10:20]
    past = device_get(fleet, term, f"/v1/files/{shared}", range=f"bytes={len(SHARED)}-")
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{len(SHARED)}"
    assert device_get(fleet, term, f"/v1/files/{'0' * 64}").status_code == 404

    # Only a device's own signature opens them: none, a stranger's, a replayed nonce.
    assert fleet.client.get(f"/v1/files/{shared}").status_code == 401
    stranger = fleet.enroll("store-2")
    stranger.key = signing.new_key()  # not the key it enrolled with
    assert device_get(fleet, stranger, f"/v1/files/{shared}").status_code == 401
    path = "/v1/releases/3.0.0/manifest"
    signed = signing.sign_request(term.key, "GET", path, b"", term.device_id, time.time())
    assert fleet.client.get(path, headers=signed).status_code == 200
    replay = fleet.client.get(path, headers=signed)
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "replayed_nonce"
    # A signature over another path does not open this one.
    other = signing.sign_request(term.key, "GET", "/v1/files/x", b"", term.device_id, time.time())
    assert fleet.client.get(path, headers=other).status_code == 401


def test_releases__without_a_release_key_the_cloud_takes_no_bundle(new_database, keys, tmp_path):
    from fleet_app import fleet_app

    with fleet_app(new_database()) as f:  # CloudSettings without release_pubkey_file
        out = upload(f, tar_gz(bundle_dir(tmp_path, "4.0.0", keys["key"], b"four")))
        assert out.status_code == 503, out.text
        assert out.json()["error"]["code"] == "no_release_key"
        assert counts(f) == (0, 0, 0)


class KeyedCloud(Cloud):
    """``tillflow cloud serve`` with a settings file naming the release public key."""

    def __init__(self, database_url: str, work: Path, pubkey: Path) -> None:
        super().__init__(database_url, work)
        self.settings = work / "cloud.yaml"
        self.settings.write_text(f"release_pubkey_file: {pubkey}\n")

    def start(self) -> str:
        cmd = [sys.executable, "-m", "edge.cli", "cloud", "serve", "--config", str(self.settings)]
        cmd += ["--database-url", self.database_url, "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--signing-key", str(self.signing_key)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TILLFLOW_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):  # bounded: serve exits or listens
            line = raw.decode()
            if line.startswith("listening on "):
                self.port = int(line.strip().rsplit(":", 1)[1])
                return self.url
        raise AssertionError(f"cloud serve exited before listening: {self.log_tail()}")


def test_fleet_releases_cli__upload_list_show_and_a_forged_bundle(
    new_database, keys, tmp_path, capsys, monkeypatch
):
    from edge.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))  # no ambient ~/.tillflow/api-token
    (tmp_path / "cloud").mkdir()
    cloud = KeyedCloud(new_database(), tmp_path / "cloud", keys["pub"])
    cloud.start()
    try:
        made = cloud.cli("api-token", "create", "--name", "ops", "--role", "operator", "--json")
        token = json.loads(made)["token"]

        def fleet(*argv: str) -> tuple[int, str, str]:
            code = main(["fleet", *argv, "--url", cloud.url, "--token", token])
            out = capsys.readouterr()
            return code, out.out, out.err

        good = tmp_path / "good.tar.gz"
        good.write_bytes(tar_gz(bundle_dir(tmp_path / "a", "5.0.0", keys["key"], b"five")))
        code, out, err = fleet("releases", "upload", str(good))
        assert code == 0, err
        assert out.startswith("release 5.0.0 uploaded: 6 files"), out
        code, out, _ = fleet("releases", "upload", str(good))
        assert code == 0 and "already held" in out

        forged = tmp_path / "forged.tar.gz"
        forged.write_bytes(tar_gz(bundle_dir(tmp_path / "f", "5.0.1", keys["foreign"], b"x")))
        code, out, err = fleet("releases", "upload", str(forged))
        assert code == 1, out
        assert "422 invalid_bundle" in err and "does not verify" in err, err

        code, out, _ = fleet("releases", "list")
        assert code == 0
        assert out.splitlines()[0].split()[:4] == ["RELEASE", "FILES", "BYTES", "NEW"]
        assert [ln.split()[0] for ln in out.splitlines()[1:]] == ["5.0.0"]
        code, out, _ = fleet("releases", "show", "5.0.0")
        assert code == 0 and "tillflow-edge/_internal/libpython.so" in out
        assert "755" in out  # the binary's mode
        code, out, _ = fleet("releases", "show", "5.0.0", "--json", "--no-files")
        assert json.loads(out)["file_list"] is None
        code, _, err = fleet("releases", "show", "6.0.0")
        assert code == 1 and "404 release_not_found" in err
    finally:
        cloud.stop()


# --- schema --------------------------------------------------------------------------------

CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
        FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename = ANY(%(tables)s)
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = current_schema() AND c.conrelid::regclass::text = ANY(%(tables)s)
        ORDER BY 1, 2""",
}
TABLES = ["releases", "release_files", "release_blobs"]


def test_schema__migrations_converge_with_schema_sql_and_rerun_is_a_no_op(new_database):
    import psycopg

    from cloud.releases import SCHEMA

    def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
        with psycopg.connect(url) as conn:
            return {k: conn.execute(q, {"tables": TABLES}).fetchall() for k, q in CATALOG.items()}

    migrated, fresh = new_database(), new_database()
    n = len(SCHEMA.migrations())
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert SCHEMA.migrate(conn, where="test") == n >= 1
    with psycopg.connect(migrated, autocommit=True) as conn, conn.transaction():
        assert SCHEMA.migrate(conn, where="test") == n  # nothing pending: nothing done
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute(SCHEMA.schema().encode())
    got = catalog(migrated)
    assert {t for t, *_ in got["columns"]} == set(TABLES)
    assert got == catalog(fresh)
