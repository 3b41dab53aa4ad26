"""Terminal releases (``cloud.releases``): upload a signed bundle (operate; ``make
bundle``'s tar.gz as the body, verified with the release key the cloud is configured
with, ``release_pubkey_file``, before anything is stored: a forged or corrupt bundle is a
422 saying why), list and show them (read). The files themselves go to terminals by
hash on the device routes (``cloud.api.releases``)."""

from __future__ import annotations

import threading
import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from cloud import releases as releases_schema
from cloud.api.fleet.auth import CanOperate, CanRead
from cloud.api.fleet.context import Ctx, FleetContext
from cloud.api.fleet.errors import ApiError
from cloud.api.fleet.paging import DEFAULT_LIMIT, After, Limit, Page, page
from cloud.fleet.tokens import Principal
from cloud.releases import store
from cloud.releases.store import Conn, ReleaseError

router = APIRouter(tags=["releases"])

#: The largest bundle taken (a bundle is about 17 MB gzip'd).
MAX_BUNDLE_BYTES = 256 * 1024 * 1024

ReleaseName = Annotated[
    str, Path(pattern=store.RELEASE_RE.pattern, description="the release, as VERSION names it")
]

_migrated: weakref.WeakSet[object] = weakref.WeakSet()
_migrating = threading.Lock()


def _ready(ctx: FleetContext, conn: Conn) -> None:
    """The releases' tables, migrated once per pool if ``serve`` has not (a new database)."""
    if ctx.pool in _migrated:
        return
    with _migrating:
        releases_schema.SCHEMA.migrate(conn, where="the control plane's database")
        _migrated.add(ctx.pool)


class ReleaseOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The release, as the binary reports itself (heartbeat binary_version).
    release: str
    #: SHA-256 of its signed SHA256SUMS: what an install_release command names.
    manifest_sha256: str
    files: int
    bytes: int
    #: Bytes of its files no release held before it (what its upload stored).
    new_bytes: int
    uploaded_at: float
    uploaded_by: str


class ReleaseFileOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str
    size: int
    mode: int


class ReleaseDetail(ReleaseOut):
    #: The release's files: path, SHA-256, size, mode (``files=false`` leaves them out).
    file_list: list[ReleaseFileOut] | None


class UploadedOut(ReleaseOut):
    #: False: this very release was held already (same signed file list); nothing new.
    created: bool


def _out(r: store.Release) -> dict[str, Any]:
    return {
        "release": r.release,
        "manifest_sha256": r.manifest_sha256,
        "files": r.files,
        "bytes": r.bytes,
        "new_bytes": r.new_bytes,
        "uploaded_at": r.uploaded_at,
        "uploaded_by": r.uploaded_by,
    }


def _api(exc: ReleaseError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def _upload(ctx: FleetContext, who: Principal, data: bytes) -> store.Uploaded:
    if not data.startswith(b"\x1f\x8b"):  # what it is not is said before the key is asked
        raise ApiError(422, "invalid_bundle", "the body is not gzip'd: send make bundle's tar.gz")
    key = ctx.settings.release_pubkey_file
    if key is None:
        raise ApiError(
            503,
            "no_release_key",
            "the control plane has no release public key (setting release_pubkey_file): "
            "it cannot verify a bundle, so it takes none",
        )
    try:
        with ctx.transaction() as conn:
            _ready(ctx, conn)
            done = store.upload(conn, data, key.expanduser(), who.name, ctx.clock.now())
            if done.created:
                r = done.release
                detail = {"manifest_sha256": r.manifest_sha256, "files": r.files}
                detail |= {"bytes": r.bytes, "new_bytes": r.new_bytes}
                ctx.record(conn, who, "release.upload", r.release, detail)
    except ReleaseError as exc:
        raise _api(exc) from None
    return done


@router.post("/api/v1/releases", status_code=201)
async def upload_release(request: Request, who: CanOperate, ctx: Ctx) -> UploadedOut:
    """Upload a signed bundle (``make bundle``'s tar.gz, ``Content-Type:
    application/gzip``). 201 with the release; the same release again is 201 with
    ``created`` false; another bundle under a held name is 409 ``release_exists``; a
    bundle that does not verify is 422 ``invalid_bundle`` naming why."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BUNDLE_BYTES:
        raise ApiError(413, "body_too_large", f"a bundle is at most {MAX_BUNDLE_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BUNDLE_BYTES:
            raise ApiError(413, "body_too_large", f"a bundle is at most {MAX_BUNDLE_BYTES} bytes")
        chunks.append(chunk)
    if not size:
        raise ApiError(422, "invalid_bundle", "the body is empty: send the bundle's tar.gz")
    done = await run_in_threadpool(_upload, ctx, who, b"".join(chunks))
    return UploadedOut(**_out(done.release), created=done.created)


def _cursor(after: str | None) -> int | None:
    if after is None:
        return None
    if not (after.isascii() and after.isdigit()) or len(after) > 18:
        raise ApiError(422, "invalid_cursor", "after is not a cursor this list gave", field="after")
    return int(after)


@router.get("/api/v1/releases")
def list_releases(
    who: CanRead, ctx: Ctx, limit: Limit = DEFAULT_LIMIT, after: After = None
) -> Page[ReleaseOut]:
    """Releases, newest upload first."""
    with ctx.transaction() as conn:
        _ready(ctx, conn)
        rows = store.releases(conn, after=_cursor(after), limit=limit + 1)
    items, nxt = page(rows, limit, lambda r: str(r.release_no))
    return Page[ReleaseOut](
        items=[ReleaseOut(**_out(r)) for r in items],
        next=nxt,
    )


@router.get("/api/v1/releases/{release}")
def get_release(
    release: ReleaseName,
    who: CanRead,
    ctx: Ctx,
    files: Annotated[bool, Query(description="list the release's files")] = True,
) -> ReleaseDetail:
    try:
        with ctx.transaction() as conn:
            _ready(ctx, conn)
            r = store.get(conn, release)
            listed = store.files(conn, release) if files else None
    except ReleaseError as exc:
        raise _api(exc) from None
    file_list = None
    if listed is not None:
        file_list = [ReleaseFileOut(path=f.path, sha256=f.sha256, size=f.size, mode=f.mode)
                     for f in listed]  # fmt: skip
    return ReleaseDetail(**_out(r), file_list=file_list)
