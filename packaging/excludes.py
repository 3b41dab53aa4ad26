"""Modules left out of the frozen terminal binary (packaging/tillflow-edge.spec).

Nothing of the cloud, the simulators, or test/build tooling; and what the terminal never
imports. ``tests/packaging/test_excludes.py`` imports every edge and sync module with
these names blocked, so a module excluded here and needed anyway fails there (and in the
frozen binary's smoke tests), not on a terminal.
"""

# fmt: off
EXCLUDES = [
    "cloud", "hwsim", "psycopg", "psycopg_pool", "psycopg_binary", "celery", "kombu",
    "billiard", "redis", "fastapi", "starlette", "uvicorn",
    "pytest", "_pytest", "hypothesis", "mypy", "ruff", "setuptools", "pkg_resources", "pip",
    "wheel", "PyInstaller",
    "tkinter", "_tkinter", "turtle", "turtledemo", "idlelib", "lib2to3", "pydoc_data",
    "ensurepip", "venv", "distutils", "test", "unittest", "doctest", "pdb", "sqlite3",
    "xmlrpc", "multiprocessing", "curses", "readline", "dbm", "tomllib", "zipapp",
]
# httpx's command line (`httpx._main`, tried at `import httpx`) pulls click and pygments
# in (2 MB of idle RSS, 20 ms) before failing on rich; without them httpx skips it.
# anyio, sniffio, trio and asyncio: async back ends of httpcore, which tries them and
# falls back; the terminal is synchronous. httpx's optional codecs and HTTP/2, SOCKS.
# pydantic.v1 is pydantic 1 kept for migrations (0.25 MB of bytecode), pydantic.mypy its
# type-checker plugin (it pulls configparser in): neither is imported by pydantic 2.
EXCLUDES += ["pydantic.v1", "pydantic.mypy"]
EXCLUDES += [
    "click", "pygments", "rich", "anyio", "sniffio", "trio", "asyncio", "h2", "socksio",
    "brotli", "brotlicffi", "zstandard",
]
# Stdlib the terminal does not use: bz2/lzma (zipfile and shutil import them optionally),
# _pydecimal (decimal's fallback when _decimal is present), pydoc, webbrowser, tarfile
# (bundles are unpacked by install.sh), and the CJK codecs (a lookup of one of them is a
# LookupError, as for any unknown codec).
CJK_CODECS = [
    "big5", "big5hkscs", "cp932", "cp949", "cp950", "euc_jis_2004", "euc_jisx0213", "euc_jp",
    "euc_kr", "gb18030", "gb2312", "gbk", "hz", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2",
    "iso2022_jp_2004", "iso2022_jp_3", "iso2022_jp_ext", "iso2022_kr", "johab", "shift_jis",
    "shift_jis_2004", "shift_jisx0213",
]
EXCLUDES += [
    "bz2", "_bz2", "lzma", "_lzma", "_pydecimal", "pydoc", "webbrowser", "tarfile",
    "_multibytecodec", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp",
    "_codecs_kr", "_codecs_tw",
] + [f"encodings.{c}" for c in CJK_CODECS]
# _hashlib: OpenSSL's hashes. hashlib and hmac import it at their own import and fall
# back to CPython's built-in _sha256, _sha512, _md5, _blake2, _sha3 without it; loading
# it maps libcrypto (3.4 MB of the idle daemon's RSS) for the audit chain's sha256,
# which the built-ins compute alike. libcrypto stays in the tree for ssl, which loads it
# with the first https call. The cost: sha256 of large files (a release's, once per
# install) at ~0.15 of OpenSSL's speed; nothing here uses pbkdf2_hmac or scrypt.
EXCLUDES += ["_hashlib"]
# fmt: on
