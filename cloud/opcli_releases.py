"""``tillflow fleet releases ...``: terminal releases over the Fleet API (registered by
``cloud.opcli``, whose client, tables and exit statuses these share).

Commands::

    upload FILE        a signed bundle (make bundle's tillflow-edge-<version>.tar.gz);
                       the cloud verifies it with its release key (a forged or corrupt
                       one is refused, saying why) and keeps its files by hash
    list               newest first: name, files, bytes, new bytes, when, by whom
    show NAME          one release and its files (--no-files: without them)

Only the standard library at import (``cloud.opcli``'s rule): httpx when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

#: ``cloud.opcli``, handed over by its ``register`` (``add_commands``).
cli: Any = None

Data = Any
Api = Any
Column = tuple[str, Callable[[dict[str, Any]], Any]]
#: Seconds an upload may take (the body is about 17 MB; the cloud verifies every file).
UPLOAD_TIMEOUT_S = 300.0


def _mb(n: Any) -> str:
    return "-" if n is None else f"{int(n) / 1e6:.1f} MB"


def list_cols() -> list[Column]:
    return [
        cli.col("RELEASE", "release"),
        cli.col("FILES", "files"),
        ("BYTES", lambda r: _mb(r.get("bytes"))),
        ("NEW", lambda r: _mb(r.get("new_bytes"))),
        cli.col("UPLOADED", "uploaded_at", time=True),
        cli.col("BY", "uploaded_by"),
        ("MANIFEST", lambda r: str(r.get("manifest_sha256", ""))[:16]),
    ]


def releases_upload(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    path = Path(a.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise cli.FleetError(f"{path}: cannot read: {exc.strerror}") from None
    httpx = api._httpx
    try:
        answer = api.client.request(
            "POST",
            cli.API + "/releases",
            content=data,
            headers={"Content-Type": "application/gzip"},
            timeout=UPLOAD_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise cli.FleetError(f"uploading to the Fleet API at {api.url}: {exc}") from None
    if answer.status_code >= 400:
        raise cli.FleetError(cli.refusal(answer))
    out = answer.json()
    verb = "uploaded" if out.get("created") else "already held"
    text = (
        f"release {out['release']} {verb}: {out['files']} files, {_mb(out['bytes'])}, "
        f"{_mb(out['new_bytes'])} new (the rest shared with releases held); "
        f"manifest {out['manifest_sha256']}"
    )
    return out, text, cli.EXIT_OK


def releases_list(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    data = cli.pages(api, a, "/releases", {})
    shown: tuple[Data, str, int] = cli.listing(data, list_cols(), "no releases")
    return shown


def releases_show(api: Api, a: argparse.Namespace) -> tuple[Data, str, int]:
    out = api.call("GET", f"/releases/{cli._seg(a.name)}", params={"files": str(a.files).lower()})
    lines = [
        f"release   {out['release']}",
        f"manifest  {out['manifest_sha256']} (SHA-256 of its signed SHA256SUMS)",
        f"files     {out['files']}, {_mb(out['bytes'])} ({_mb(out['new_bytes'])} new at upload)",
        f"uploaded  {cli.when(out.get('uploaded_at'))} by {out.get('uploaded_by')}",
    ]
    if out.get("file_list"):
        cols = [cli.col("MODE", "mode_text"), ("SIZE", lambda r: str(r["size"])),
                ("SHA256", lambda r: r["sha256"][:16]), cli.col("PATH", "path")]  # fmt: skip
        rows = [{**f, "mode_text": oct(f["mode"])[2:]} for f in out["file_list"]]
        lines += ["", cli.table(rows, cols, "no files")]
    return out, "\n".join(lines), cli.EXIT_OK


def add_commands(opcli: ModuleType, group: Any, leaf: Any) -> None:
    """The ``releases`` group and its commands (``opcli``: ``cloud.opcli`` itself;
    ``group``/``leaf``: its register's makers of a group and a command)."""
    global cli
    cli = opcli
    g = group("releases", "terminal releases: signed bundles, kept file by file")
    c = leaf(g, "upload", releases_upload, "upload a signed bundle (make bundle's tar.gz)")
    c.add_argument("file", metavar="FILE", help="tillflow-edge-<version>.tar.gz")
    leaf(g, "list", releases_list, "releases, newest first", paged=True)
    c = leaf(g, "show", releases_show, "one release and its files")
    c.add_argument("name", metavar="NAME", help="the release (its VERSION)")
    c.add_argument("--no-files", dest="files", action="store_false", help="leave out the files")
