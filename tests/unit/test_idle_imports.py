"""What the idle terminal daemon has imported, pinned (issue 17: start and idle light).

The daemon that ships (``tillflow-edge run``, ``sync.device.main``) is started from
source in a child interpreter, left to turn its main loop (two maintenance passes, a
second apart), then asked by SIGUSR1 for its ``sys.modules``. What only a rare path
needs must not be there: httpx (the HTTP step type, the device drivers' first call),
cryptography (the first card to protect), ssl, the sync client (a config without
``cloud:``), the policy compiler (no policy file), thread pools of step timeouts, ...
A top-level ``import httpx`` put back into the engine fails here, as does any import
that drags one of those in at start. Then each deferred path is shown to still work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Seconds a passing run takes well inside: a start, two loop turns, one dump.
DEADLINE_S = 60.0

#: Modules (and their submodules) the idle daemon must not have imported, with why.
NOT_AT_IDLE = {
    "httpx": "HTTP step type and device drivers: imported by the first call",
    "httpcore": "httpx's transport",
    "idna": "httpx's URL parser",
    "certifi": "the drivers' TLS context, built with the first client",
    "ssl": "TLS: the first https call",
    "_ssl": "TLS: the first https call",
    "cryptography": "DataKey derives its subkeys for the first card",
    "_hashlib": "left out of the binary (packaging/excludes.py); blocked here as there",
    "concurrent.futures": "the pool of step timeouts and parallel tasks",
    "subprocess": "git, for --version from a checkout",
    "difflib": "the loader's 'did you mean' hint",
    "tzdata": "no time-zone database: schedules use the local zone",
    "edge.terminal.sale.policy.compiled": "the policy compiler: no policy_file",
    "sync.device.client": "the sync client: no cloud section",
    "sync.device.identity": "enrollment: no cloud section",
    "sync.device.service": "the sync service: no cloud section",
    "sync.signing": "request signing: no cloud section",
    "sync.device.releases": "release installs: a command from the cloud",
}

#: The child: packaging/excludes.py's modules absent (as in the frozen binary), a
#: SIGUSR1 handler that writes sys.modules (the daemon leaves that signal alone), then
#: ``tillflow-edge`` itself.
PROBE = textwrap.dedent(
    """
    import json, os, runpy, signal, sys
    sys.path.insert(0, {packaging!r})
    from excludes import EXCLUDES
    for name in EXCLUDES:
        sys.modules.setdefault(name, None)
    OUT = sys.argv[1]
    def dump(*_):
        with open(OUT + ".tmp", "w") as f:
            json.dump(sorted(k for k, v in sys.modules.items() if v is not None), f)
        os.replace(OUT + ".tmp", OUT)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["tillflow-edge", *sys.argv[2:]]
    runpy.run_module("sync.device.main", run_name="__main__", alter_sys=True)
    """
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory short enough for the POS socket's path (sockaddr_un: 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tfi-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILLFLOW_", "NOTIFY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _wait(condition: str, check: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():  # type: ignore[operator]
        if proc.poll() is not None:
            pytest.fail(f"daemon exited {proc.returncode} before {condition}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {condition} within {DEADLINE_S}s:\n{log.read_text()}")
        time.sleep(0.05)  # polling what the child writes, against a deadline


def idle_modules(home: Path) -> list[str]:
    """``sys.modules`` of ``tillflow-edge run`` after two turns of its main loop."""
    config = home / "edge.yaml"
    config.write_text(
        "device_id: T-IDLE\n"
        f"data_dir: {home / 'data'}\n"
        f"socket_path: {home / 'edge.sock'}\n"
        "log_format: json\n"
        "maintenance_interval_s: 1\n"
        "peripherals:\n"
        "  card_reader: {url: 'http://127.0.0.1:9'}\n"
        "  printer: {url: 'http://127.0.0.1:9'}\n"
        "  link: {url: 'http://127.0.0.1:9/link'}\n"
        "  acquirer: {url: 'http://127.0.0.1:9'}\n"
    )
    probe, out, log = home / "probe.py", home / "modules.json", home / "daemon.log"
    probe.write_text(PROBE.format(packaging=str(REPO / "packaging")))
    cmd = [sys.executable, str(probe), str(out), "run", "--config", str(config)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, env=_child_env(), cwd=home, stdout=subprocess.DEVNULL, stderr=err
        )
    try:

        def passes() -> int:
            return log.read_text().count('"action": "maintenance"')

        _wait("second maintenance pass", lambda: passes() >= 2, proc, log)
        proc.send_signal(signal.SIGUSR1)
        _wait("module list", out.exists, proc, log)
        modules: list[str] = json.loads(out.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    return modules


def _offending(modules: list[str]) -> dict[str, str]:
    return {
        m: why
        for m in modules
        for name, why in NOT_AT_IDLE.items()
        if m == name or m.startswith(name + ".")
    }


def test_idle_daemon__has_imported_none_of_the_rare_paths(short_dir: Path) -> None:
    modules = idle_modules(short_dir)
    # It is the daemon that ships, serving: its loop, the POS API, the engine, the store.
    for needed in (
        "sync.device",  # sync.device.main itself runs as __main__
        "edge.terminal.service.daemon",
        "edge.terminal.service.httpserver",
        "edge.engine.runtime",
        "edge.store.sqlite",
        "h11",
        "pydantic",
        "yaml",
        "apsw",
    ):
        assert needed in modules
    assert _offending(modules) == {}
    # A ceiling, not a target: ~350 today; a new heavy import shows as a jump.
    assert len(modules) < 420, len(modules)


def _imports_in_child(code: str) -> list[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=_child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=True,
    )
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return modules


def test_import_edge_engine__brings_no_httpx_and_no_thread_pool() -> None:
    modules = _imports_in_child("import edge.engine")
    assert "edge.engine.runtime" in modules and "edge.engine.steps" in modules
    assert not {"httpx", "httpcore", "concurrent.futures", "cryptography"} & set(modules)


def test_checker__catches_a_module_that_should_not_be_there() -> None:
    """The check above can fail: what a top-level ``import httpx`` would leave."""
    assert set(_offending(["edge.engine", "httpx", "httpx._client", "sync.device.main"])) == {
        "httpx",
        "httpx._client",
    }


# --- the deferred paths still work ---------------------------------------------------------


def test_drivers__import_httpx_at_their_first_call_and_then_work() -> None:
    code = textwrap.dedent(
        """
        import sys
        from edge.terminal.drivers.devices_http import HttpNetworkLink
        from edge.terminal.drivers.acquirer_http import HttpAcquirer
        link = HttpNetworkLink("http://127.0.0.1:9/link")
        acquirer = HttpAcquirer("http://127.0.0.1:9", link=link)
        assert "httpx" not in sys.modules, "built without a call"
        assert link.is_up() is False  # nothing listens on port 9: down, never raises
        assert "httpx" in sys.modules
        link.close(); acquirer.close()
        """
    )
    _imports_in_child(code)


#: URLs the drivers are given: plain ones are checked without httpx, the rest by it.
URLS = [
    "http://127.0.0.1:8791",
    "http://127.0.0.1:8791/",
    "https://acquirer.example:8443/v1/",
    "http://devices.local/link",
    "http://h:65535/a/b~c_d.e-f",
    "http://h:99999",
    "http://h:80",
    "https://h:443/",
    "http://h:08",
    "http://H:8791",
    "HTTP://h:8791",
    "http://999.1.1.1",
    "http://1.2.3.04",
    "http://1.2.3",
    "http://0.0.0.0:1",
    "http://user:secret@h:8791/",
    "http://h/a b",
    "http://h/%41",
    "http://[::1]:8791",
    "http://bücher.example",
    "ftp://h",
    "not a url",
    "http://",
    "",
]


@pytest.mark.parametrize("url", URLS)
def test_endpoint__plain_urls_are_what_httpx_makes_of_them(url: str) -> None:
    import httpx

    from edge.errors import ConfigError
    from edge.terminal.drivers._http import _plain, endpoint, shown

    try:
        parsed = httpx.URL(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.host)
    except httpx.InvalidURL:
        ok = False
    if not ok:
        assert not _plain(url)
        with pytest.raises(ConfigError):
            endpoint("card reader", url)
        return
    assert endpoint("card reader", url) == (str(parsed), shown(parsed))
    if _plain(url):
        assert str(parsed) == url  # as written: nothing for httpx to normalise


def test_data_key__derives_at_first_use_what_it_derived_at_load() -> None:
    code = textwrap.dedent(
        """
        import sys, tempfile
        from pathlib import Path
        from edge.terminal.carddata import DataKey
        d = Path(tempfile.mkdtemp())
        key = DataKey.load_or_create(d)
        assert "cryptography" not in sys.modules, "loading a key derives nothing"
        token = key.encrypt_pan("4111111111111111")
        again = DataKey.load_or_create(d)  # the same file, derived again
        assert again.decrypt_pan(token) == "4111111111111111"
        pan = "4111111111111111"
        assert again.key_id == key.key_id and again.pan_hash(pan) == key.pan_hash(pan)

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        raw = (d / "card-data.key").read_bytes()
        info = b"tillflow/card-data/key-id/v1"
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(raw)
        assert key.key_id == expected[:8].hex()
        """
    )
    _imports_in_child(code)


def test_sync_device__every_public_name_resolves_at_first_access() -> None:
    import importlib

    import sync.device as package

    for name in package.__all__:
        value = getattr(package, name)
        home = importlib.import_module(f"sync.device.{package._HOMES[name]}")
        assert value is getattr(home, name)
        assert name in dir(package)
    with pytest.raises(AttributeError):
        _ = package.NoSuchName  # type: ignore[attr-defined]


# --- the binary's runtime hook: no pydantic plugin discovery ------------------------------

RTHOOK = REPO / "packaging" / "rthooks" / "pyi_rth_pydantic_plugins.py"


def test_pydantic_rthook__models_work_without_importlib_metadata() -> None:
    code = textwrap.dedent(
        f"""
        import runpy, sys
        runpy.run_path({str(RTHOOK)!r})
        from pydantic import BaseModel

        class M(BaseModel):
            x: int

        assert M(x=1).x == 1
        assert "importlib.metadata" not in sys.modules
        """
    )
    _imports_in_child(code)


def test_pydantic_rthook__stands_where_pydantic_asks_and_hides_no_plugin() -> None:
    """The hook replaces a private module: if pydantic stops asking it (an upgrade), or a
    distribution declares a plugin, the binary would differ from source; this fails."""
    import inspect
    from importlib.metadata import entry_points

    from pydantic.plugin import _schema_validator

    assert "from ._loader import get_plugins" in inspect.getsource(_schema_validator)
    assert list(entry_points(group="pydantic")) == []


# --- the loader's libyaml fast path: the same nodes as the pure-Python parser -------------


def _shape(node: object) -> object:
    import yaml

    assert isinstance(node, yaml.Node)
    line = node.start_mark.line
    if isinstance(node, yaml.MappingNode):
        return (node.tag, line, [(_shape(k), _shape(v)) for k, v in node.value])
    if isinstance(node, yaml.SequenceNode):
        return (node.tag, line, [_shape(v) for v in node.value])
    return (node.tag, line, node.value)


def test_loader__libyaml_builds_the_nodes_the_python_parser_builds() -> None:
    import yaml

    from edge.engine.loader import _FAST_LOADER

    assert _FAST_LOADER is yaml.CSafeLoader  # the binary bundles _yaml: the fast path runs
    files = sorted((REPO / "edge").rglob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        text = path.read_text()
        fast = yaml.compose(text, Loader=_FAST_LOADER)
        assert _shape(fast) == _shape(yaml.compose(text, Loader=yaml.SafeLoader)), path


def test_loader__bad_yaml_is_reported_in_the_python_parser_s_words() -> None:
    from edge.engine.loader import load_text
    from edge.errors import DefinitionError

    with pytest.raises(DefinitionError) as caught:
        load_text("workflow_type: x\nsteps: [a: b: c\n", "bad.yaml")
    text = str(caught.value)
    assert "bad.yaml" in text and "not valid YAML" in text
    assert "^" in text  # PyYAML's snippet with a caret; libyaml's message has none
