"""The device's release routes: what a terminal told to ``install_release`` fetches.

- ``GET /v1/releases/{release}/manifest``  the release's signed file list:
  ``{"release", "manifest_sha256", "sums", "signature", "sizes", "modes"}`` (``sums``
  the exact text of ``SHA256SUMS``, ``signature`` its Ed25519 signature, base64;
  ``sizes`` sha256 -> bytes and ``modes`` path -> mode, unsigned hints). The terminal
  checks the SHA-256 of ``sums`` against its command's ``manifest_sha256`` and the
  signature with its own pinned release key: the cloud is not trusted with the
  release's integrity.
- ``GET /v1/files/{sha256}``  one file's bytes by content hash, ``Range: bytes=N-`` or
  ``bytes=N-M`` answered 206 with ``Content-Range`` (an interrupted download resumes),
  ``Accept-Ranges: bytes``; a range past the end is 416.

Both are signed by the device as ``/v1/sync`` is (``sync.signing``, over the method, the
path and an empty body; a nonce once), checked by the sync service in the transaction
that reads the answer; a revoked or unknown device is refused as on sync. Errors are the
sync routes' shape, ``{"error": {code, message, field}}``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cloud.api.fleet.auth import device_signed
from cloud.releases import store
from cloud.releases.store import ReleaseError
from cloud.sync.postgres import PostgresSyncTx
from sync import wire
from sync.server import BackendUnavailable, SyncService
from sync.server_ingest import Refusal

MANIFEST_PATH = "/v1/releases/{release}/manifest"
FILE_PATH = "/v1/files/{sha256}"
_RANGE = re.compile(r"^bytes=(\d{1,18})-(\d{0,18})$")


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(wire.WireError(code, message).body(), status_code=status, headers=headers)


def _refused(exc: Refusal) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _manifest(service: SyncService, request: Request, release: str) -> JSONResponse:
    try:
        with service.backend.transaction() as tx:
            service._authenticate(tx, "GET", request.url.path, request.headers, b"")
            assert isinstance(tx, PostgresSyncTx)
            if not store.RELEASE_RE.match(release):
                raise ReleaseError(404, "release_not_found", "no such release")
            m = store.manifest(tx.conn, release)
            listed = store.files(tx.conn, release)
    except Refusal as exc:
        return _refused(exc)
    except ReleaseError as exc:
        return _error(exc.status, exc.code, exc.message)
    except BackendUnavailable as exc:
        return _error(503, "unavailable", f"the service is unavailable: {exc.message}")
    return JSONResponse(
        {
            "release": m.release,
            "manifest_sha256": m.manifest_sha256,
            "sums": m.sums,
            "signature": base64.b64encode(m.signature).decode(),
            # Not signed, so only hints: a size lets the terminal find a file it holds
            # without hashing every other; a mode which downloaded file is executable.
            "sizes": {f.sha256: f.size for f in listed},
            "modes": {f.path: f.mode for f in listed},
        }
    )


def _file(service: SyncService, request: Request, sha256: str) -> Response:
    wanted = request.headers.get("range")
    try:
        with service.backend.transaction() as tx:
            service._authenticate(tx, "GET", request.url.path, request.headers, b"")
            assert isinstance(tx, PostgresSyncTx)
            size = store.blob_size(tx.conn, sha256)
            if size is None:
                return _error(404, "file_not_found", f"no release file {sha256[:64]}")
            start, end = 0, size - 1
            if wanted is not None:
                m = _RANGE.match(wanted.strip())
                if m is None:
                    return _error(
                        416, "bad_range", "one range only: bytes=START- or bytes=START-END"
                    )
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), size - 1)
                if start >= size or start > end:
                    return _error(
                        416,
                        "bad_range",
                        f"the range {wanted[:60]} is outside the file's {size} bytes",
                        {"Content-Range": f"bytes */{size}"},
                    )
            content = store.blob_range(tx.conn, sha256, start, end - start + 1) if size else b""
    except Refusal as exc:
        return _refused(exc)
    except BackendUnavailable as exc:
        return _error(503, "unavailable", f"the service is unavailable: {exc.message}")
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    if wanted is None:
        return Response(content, 200, headers=headers, media_type="application/octet-stream")
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Response(content, 206, headers=headers, media_type="application/octet-stream")


def add_release_routes(app: FastAPI, service: SyncService) -> None:
    """The two device routes on ``app`` (beside the sync routes), each ``device_signed``."""
    signed_rule = [Depends(device_signed())]

    @app.get(MANIFEST_PATH, dependencies=signed_rule, include_in_schema=False)
    async def release_manifest(request: Request, release: str) -> Response:
        return await run_in_threadpool(_manifest, service, request, release)

    @app.get(FILE_PATH, dependencies=signed_rule, include_in_schema=False)
    async def release_file(request: Request, sha256: str) -> Response:
        return await run_in_threadpool(_file, service, request, sha256)
