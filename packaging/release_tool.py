"""Release tooling: build info of ``dist/``, key pairs, signed bundles.

    python packaging/release_tool.py report [--dist dist/tillflow-edge]
    python packaging/release_tool.py normalise [--dist dist/tillflow-edge]
    python packaging/release_tool.py keygen --out-dir DIR        # release.key + release.pub
    python packaging/release_tool.py bundle --key FILE [--version V] [--dist D] [--out DIR]
    python packaging/release_tool.py sign DIR --key FILE
    python packaging/release_tool.py verify DIR --pubkey FILE

``bundle`` writes ``<out>/tillflow-edge-<version>.tar.gz``: one top directory
``tillflow-edge-<version>/`` holding ``VERSION``, ``install.sh``, the unit, the update
hand-off (``tillflow-edge-update.path``/``.service`` and the root side's
``tillflow-edge-update.sh``: systemd/README.md), a default config ``edge.yaml``, the
onedir binary ``tillflow-edge/`` and a signed ``SHA256SUMS``.
Entries are sorted, owned by 0:0, dated ``SOURCE_DATE_EPOCH`` (default: the commit's
date), so two bundles of one build compare equal byte for byte.

``normalise`` (run by ``make package`` after PyInstaller) makes two builds of one source
compare equal file for file, so a release that changes little has few new file hashes
and a terminal's delta download stays small (README "Releases"). PyInstaller writes
``_internal/base_library.zip`` (the stdlib the bootloader imports first) in the order
of a set of module names, which follows the hash seed; ``normalise`` rewrites it with
its members sorted, each dated 1980-01-01 with fixed attributes, its compression kept.
The Makefile also sets ``PYTHONHASHSEED=0`` and ``SOURCE_DATE_EPOCH`` (the build date
baked into the binary) for the build.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `edge` importable
    sys.path.insert(0, str(ROOT))

from edge.terminal.service.release import (  # noqa: E402
    generate_keypair,
    sign_bundle,
    sums_text,
    verify_bundle,
)

DIST = ROOT / "dist" / "tillflow-edge"
UNIT = ROOT / "systemd" / "tillflow-edge.service"
INSTALLER = ROOT / "packaging" / "install.sh"
#: What a terminal under systemd installs a release it was told to with (root's side).
UPDATE_FILES = (
    ROOT / "systemd" / "tillflow-edge-update.path",
    ROOT / "systemd" / "tillflow-edge-update.service",
    ROOT / "packaging" / "tillflow-edge-update.sh",
)
DEFAULT_CONFIG = ROOT / "edge" / "terminal" / "edge.example.yaml"


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def report(dist: Path) -> str:
    exe = dist / "tillflow-edge"
    if not exe.is_file():
        raise SystemExit(f"{exe}: no binary; run `make package`")
    files = [p for p in dist.rglob("*") if p.is_file()]
    sums = sums_text(dist)
    exe_sha = hashlib.sha256(exe.read_bytes()).hexdigest()
    return (
        f"{exe}: executable {exe.stat().st_size / 1e6:.1f} MB, sha256 {exe_sha}\n"
        f"{dist}/: {tree_size(dist) / 1e6:.1f} MB in {len(files)} files, "
        f"sha256 of its SHA256SUMS {hashlib.sha256(sums.encode()).hexdigest()}"
    )


#: The zip archives of a onedir build whose member order and dates the build leaves open.
NORMALISED = ("_internal/base_library.zip",)
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def normalise_zip(path: Path) -> bool:
    """Rewrite the zip ``path`` deterministically (sorted members, fixed dates and
    attributes, each member's compression kept); True when its bytes changed."""
    before = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(before)) as src:
        members = sorted(src.infolist(), key=lambda i: i.filename)
        names = [i.filename for i in members]
        if len(set(names)) != len(names):
            raise SystemExit(f"{path}: a member name appears twice; not normalised")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as out:
            for info in members:
                fixed = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
                fixed.compress_type = info.compress_type
                fixed.create_system = 3  # unix
                mode = 0o755 if info.is_dir() else 0o644
                fixed.external_attr = (mode | (0o040000 if info.is_dir() else 0o100000)) << 16
                out.writestr(fixed, src.read(info))
    after = buf.getvalue()
    if after == before:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(after)
    tmp.replace(path)
    return True


def normalise(dist: Path) -> list[str]:
    """Normalise the build in ``dist`` (module docstring); the files it rewrote."""
    if not (dist / "tillflow-edge").is_file():
        raise SystemExit(f"{dist}: no binary; run `make package`")
    changed = []
    for rel in NORMALISED:
        if (dist / rel).is_file() and normalise_zip(dist / rel):
            changed.append(rel)
    return changed


def _epoch() -> int:
    if value := os.environ.get("SOURCE_DATE_EPOCH"):
        return int(value)
    out = subprocess.run(
        ["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else 0


def stage(folder: Path, dist: Path, version: str) -> None:
    """Lay out an unsigned bundle in ``folder``."""
    folder.mkdir(parents=True)
    (folder / "VERSION").write_text(version + "\n")
    shutil.copy2(INSTALLER, folder / "install.sh")
    (folder / "install.sh").chmod(0o755)
    shutil.copy2(UNIT, folder / "tillflow-edge.service")
    for path in UPDATE_FILES:
        shutil.copy2(path, folder / path.name)
    shutil.copy2(DEFAULT_CONFIG, folder / "edge.yaml")
    shutil.copytree(dist, folder / "tillflow-edge", symlinks=False)


def write_tar(folder: Path, out: Path) -> None:
    epoch = _epoch()

    def owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = epoch
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = sorted([folder, *folder.rglob("*")])
        for path in paths:
            arc = path.relative_to(folder.parent).as_posix()
            tar.add(path, arcname=arc, recursive=False, filter=owned_by_root)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue())
    tmp.replace(out)


def bundle(key: Path, version: str, dist: Path, out_dir: Path) -> Path:
    if not (dist / "tillflow-edge").is_file():
        raise SystemExit(f"{dist}: no binary; run `make package`")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"tillflow-edge-{version}"
    with tempfile.TemporaryDirectory(prefix="tf-bundle-") as tmp:
        folder = Path(tmp) / name
        stage(folder, dist, version)
        sign_bundle(folder, key)
        out = out_dir / f"{name}.tar.gz"
        write_tar(folder, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("report", help="size and SHA-256 of the built binary")
    s.add_argument("--dist", type=Path, default=DIST)
    s = sub.add_parser("normalise", help="make the build's zip archives deterministic")
    s.add_argument("--dist", type=Path, default=DIST)
    s = sub.add_parser("keygen", help="make an Ed25519 release key pair")
    s.add_argument("--out-dir", type=Path, required=True)
    s = sub.add_parser("bundle", help="a signed tillflow-edge-<version>.tar.gz")
    s.add_argument("--key", type=Path, required=True, help="release private key (PEM)")
    s.add_argument("--version", default=None, help="default: pyproject's version")
    s.add_argument("--dist", type=Path, default=DIST, help="the onedir build to ship")
    s.add_argument("--out", type=Path, default=ROOT / "dist")
    s = sub.add_parser("sign", help="(re)write SHA256SUMS and its signature in DIR")
    s.add_argument("dir", type=Path)
    s.add_argument("--key", type=Path, required=True)
    s = sub.add_parser("verify", help="check an unpacked bundle")
    s.add_argument("dir", type=Path)
    s.add_argument("--pubkey", type=Path, required=True)
    args = p.parse_args(argv)

    if args.command == "report":
        print(report(args.dist))
    elif args.command == "normalise":
        changed = normalise(args.dist)
        print(f"normalised {', '.join(changed)}" if changed else f"{args.dist}: already normal")
    elif args.command == "keygen":
        args.out_dir.mkdir(parents=True, exist_ok=True)
        generate_keypair(args.out_dir / "release.key", args.out_dir / "release.pub")
        print(f"wrote {args.out_dir}/release.key (keep it secret) and release.pub")
    elif args.command == "bundle":
        out = bundle(args.key, args.version or project_version(), args.dist, args.out)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, sha256 {digest}")
    elif args.command == "sign":
        sign_bundle(args.dir, args.key)
        print(f"signed {args.dir}")
    else:
        files = verify_bundle(args.dir, args.pubkey)
        print(f"ok   {args.dir}: signature and {len(files)} file checksum(s) verify")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
