"""Releases in the database: an uploaded bundle verified, then kept file by file.

``upload(conn, data, pubkey, by, at)`` takes ``make bundle``'s tar.gz: it is unpacked
into a temporary directory (members as ``tarfile``'s ``data`` filter allows them, with
caps on count and size) and checked with the terminal's own verifier
(``edge.terminal.service.release.verify_bundle``: the signature of ``SHA256SUMS`` under
the release key the cloud is configured with, every file's digest, no unlisted file)
before anything is written. Then, in the caller's transaction: the release row (its
name is the bundle's ``VERSION``, which the binary reports as its ``binary_version``),
one ``release_files`` row per listed file, and the bytes of each file whose SHA-256 no
release holds yet (``release_blobs``: one copy per distinct file).

A bundle that is not one, does not verify, or names a release already held with other
contents is a ``ReleaseError`` (a 422 or 409 saying why); nothing is stored.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import psycopg

from edge.errors import BundleInvalid, ConfigError
from edge.terminal.service.release import SIGNATURE, SUMS, verify_bundle

Conn = psycopg.Connection[tuple[Any, ...]]

#: At most this many members in a bundle, and this many bytes unpacked (a bundle is
#: about 1,000 files and 50 MB).
MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 1 << 30
#: A release name as install.sh accepts a VERSION (and the wire an Id).
RELEASE_RE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(Exception):
    """A refused upload or an unknown release: HTTP status, stable code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Release:
    release: str
    manifest_sha256: str
    files: int
    bytes: int
    #: Bytes of its files that no release held when it was uploaded.
    new_bytes: int
    uploaded_at: float
    uploaded_by: str
    release_no: int


@dataclass(frozen=True)
class ReleaseFile:
    path: str
    sha256: str
    size: int
    mode: int


@dataclass(frozen=True)
class Manifest:
    release: str
    manifest_sha256: str
    sums: str
    signature: bytes


@dataclass(frozen=True)
class Uploaded:
    release: Release
    #: False: this very release was held already (the same signed file list).
    created: bool


@dataclass(frozen=True)
class _Bundle:
    release: str
    sums: str
    signature: bytes
    #: path -> (sha256, size, mode, bytes)
    files: dict[str, tuple[str, int, int, bytes]]


# --- unpacking and verifying -------------------------------------------------------------


def _refuse(message: str) -> ReleaseError:
    return ReleaseError(422, "invalid_bundle", message)


def _unpack(data: bytes, into: Path) -> Path:
    """Unpack the tar.gz ``data`` into ``into``; returns its one top directory."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = []
            total = 0
            for member in tar:
                members.append(member)
                total += max(member.size, 0)
                if len(members) > MAX_MEMBERS or total > MAX_UNPACKED_BYTES:
                    raise _refuse(
                        f"the bundle is over {MAX_MEMBERS} files or {MAX_UNPACKED_BYTES} bytes"
                    )
                if not (member.isdir() or member.isfile()):
                    raise _refuse(f"{member.name}: a bundle holds directories and files only")
            tops = {PurePosixPath(m.name).parts[0] for m in members if m.name not in ("", ".")}
            if len(tops) != 1:
                raise _refuse(f"a bundle has one top directory, this one {len(tops)}")
            tar.extractall(into, members=members, filter="data")
    except ReleaseError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        why = f"not make bundle's tillflow-edge-<version>.tar.gz: {type(exc).__name__}: {exc}"
        raise _refuse(why) from exc
    top = into / tops.pop()
    if not top.is_dir():
        raise _refuse(f"{top.name} is not a directory")
    return top


def read_bundle(data: bytes, pubkey: Path) -> _Bundle:
    """The verified bundle in ``data`` (raises ``ReleaseError`` naming why not)."""
    with tempfile.TemporaryDirectory(prefix="tf-release-") as tmp:
        top = _unpack(data, Path(tmp))
        try:
            paths = verify_bundle(top, pubkey)
        except BundleInvalid as exc:
            why = str(exc).replace(str(top), top.name)
            raise _refuse(f"the bundle does not verify: {why}") from None
        except ConfigError as exc:  # our own key is unreadable: not the caller's fault
            raise ReleaseError(503, "no_release_key", str(exc)) from None
        version_file = top / "VERSION"
        if "VERSION" not in paths or not version_file.is_file():
            raise _refuse("the bundle holds no VERSION: not a tillflow-edge bundle")
        release = version_file.read_text(encoding="utf-8", errors="replace").strip()
        if not RELEASE_RE.match(release):
            raise _refuse(f"VERSION {release[:80]!r} is not a release name")
        if top.name != f"tillflow-edge-{release}":
            raise _refuse(f"the top directory {top.name} does not name VERSION {release}")
        files = {}
        for rel in paths:
            path = top / rel
            content = path.read_bytes()
            mode = 0o755 if path.stat().st_mode & 0o100 else 0o644
            files[rel] = (hashlib.sha256(content).hexdigest(), len(content), mode, content)
        return _Bundle(
            release=release,
            sums=(top / SUMS).read_text(encoding="utf-8"),
            signature=(top / SIGNATURE).read_bytes(),
            files=files,
        )


# --- the tables ---------------------------------------------------------------------------

_COLUMNS = "release, manifest_sha256, files, bytes, new_bytes, uploaded_at, uploaded_by, release_no"


def _release(row: tuple[Any, ...]) -> Release:
    return Release(
        release=row[0],
        manifest_sha256=row[1],
        files=int(row[2]),
        bytes=int(row[3]),
        new_bytes=int(row[4]),
        uploaded_at=float(row[5]),
        uploaded_by=row[6],
        release_no=int(row[7]),
    )


def upload(conn: Conn, data: bytes, pubkey: Path, by: str, at: float) -> Uploaded:
    """Verify the bundle ``data`` and keep it (module docstring), in ``conn``'s
    transaction. The same release uploaded again is not an error (``created`` False)."""
    bundle = read_bundle(data, pubkey)
    manifest = hashlib.sha256(bundle.sums.encode()).hexdigest()
    held = find(conn, bundle.release)
    if held is not None:
        if held.manifest_sha256 == manifest:
            return Uploaded(held, created=False)
        raise ReleaseError(
            409,
            "release_exists",
            f"release {bundle.release} is held with another file list "
            f"(manifest {held.manifest_sha256[:16]}…); a release name is never reused",
        )
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x7417_0E1F,))  # blobs' inserts
    digests = sorted({f[0] for f in bundle.files.values()})
    present = {
        r[0]
        for r in conn.execute(
            "SELECT sha256 FROM release_blobs WHERE sha256 = ANY(%s)", (digests,)
        ).fetchall()
    }
    new_bytes, stored = 0, set()
    with conn.cursor() as cur:
        for digest, size, _mode, content in bundle.files.values():
            if digest in present or digest in stored:
                continue
            cur.execute(
                "INSERT INTO release_blobs (sha256, size, content) VALUES (%s, %s, %s)",
                (digest, size, content),
            )
            stored.add(digest)
            new_bytes += size
    total = sum(f[1] for f in bundle.files.values())
    row = conn.execute(
        "INSERT INTO releases (release, manifest_sha256, sums, signature, files, bytes, "
        "new_bytes, uploaded_at, uploaded_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        f"RETURNING {_COLUMNS}",
        (
            bundle.release,
            manifest,
            bundle.sums,
            bundle.signature,
            len(bundle.files),
            total,
            new_bytes,
            at,
            by,
        ),
    ).fetchone()
    assert row is not None
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO release_files (release, path, sha256, size, mode) "
            "VALUES (%s, %s, %s, %s, %s)",
            [(bundle.release, p, f[0], f[1], f[2]) for p, f in sorted(bundle.files.items())],
        )
    return Uploaded(_release(row), created=True)


def find(conn: Conn, release: str) -> Release | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM releases WHERE release = %s", (release,)).fetchone()
    return None if row is None else _release(row)


def get(conn: Conn, release: str) -> Release:
    found = find(conn, release)
    if found is None:
        raise ReleaseError(404, "release_not_found", f"no release {release[:80]}")
    return found


def releases(conn: Conn, *, after: int | None = None, limit: int = 100) -> list[Release]:
    """Releases, newest upload first; ``after``: a ``release_no`` of the page before."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM releases WHERE (%(after)s::bigint IS NULL "
        "OR release_no < %(after)s) ORDER BY release_no DESC LIMIT %(limit)s",
        {"after": after, "limit": limit},
    ).fetchall()
    return [_release(r) for r in rows]


def files(conn: Conn, release: str) -> list[ReleaseFile]:
    rows = conn.execute(
        "SELECT path, sha256, size, mode FROM release_files WHERE release = %s ORDER BY path",
        (release,),
    ).fetchall()
    return [ReleaseFile(r[0], r[1], int(r[2]), int(r[3])) for r in rows]


def manifest(conn: Conn, release: str) -> Manifest:
    row = conn.execute(
        "SELECT release, manifest_sha256, sums, signature FROM releases WHERE release = %s",
        (release,),
    ).fetchone()
    if row is None:
        raise ReleaseError(404, "release_not_found", f"no release {release[:80]}")
    return Manifest(row[0], row[1], row[2], bytes(row[3]))


def blob_size(conn: Conn, sha256: str) -> int | None:
    if not _HEX64.match(sha256):
        return None
    row = conn.execute("SELECT size FROM release_blobs WHERE sha256 = %s", (sha256,)).fetchone()
    return None if row is None else int(row[0])


def blob_range(conn: Conn, sha256: str, start: int, length: int) -> bytes:
    """``length`` bytes of a blob from ``start`` (0-based), read in the database."""
    row = conn.execute(
        "SELECT substring(content FROM %s FOR %s) FROM release_blobs WHERE sha256 = %s",
        (start + 1, length, sha256),
    ).fetchone()
    return b"" if row is None else bytes(row[0])


def blob_count(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM release_blobs").fetchone()
    return int(row[0]) if row else 0
