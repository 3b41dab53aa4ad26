"""What every HTTP driver of the terminal shares (acquirer, card reader, printer, link):
URL checks, client ownership, lifecycle, and error text scrubbed of anything that could
be a card number.

httpx is imported when a driver first talks to its device, not when it is built: an
idle terminal makes no HTTP call, and httpx with its TLS context is ~13 MB of RSS and
~40 ms of start. A plain URL (the usual ``http://127.0.0.1:8791``) is checked here
without it; anything else goes to httpx's parser at start, as before, so what is
accepted and what a refusal says do not change (``tests/unit/test_idle_imports.py``).
"""

from __future__ import annotations

import functools
import re
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Self

from edge.errors import ConfigError

if TYPE_CHECKING:
    import ssl  # ssl (and libssl) come with the first https call, through httpx

    import httpx

#: A run of digits as long as a PAN: never let one into a message or a log line.
DIGIT_RUNS = re.compile(r"\d{12,19}")

#: URLs that httpx.URL keeps exactly as written: lower-case http(s), a lower-case name
#: or a valid IPv4 address, a port other than the scheme's default without a leading
#: zero, a path of unreserved characters. Anything else is parsed (and normalised, or
#: refused with its reason) by httpx.
_PLAIN_URL = re.compile(
    r"(?P<scheme>https?)://(?P<host>[a-z0-9-][a-z0-9.-]*)(?::(?P<port>[1-9][0-9]{0,4}))?"
    r"(?:/[A-Za-z0-9._~/-]*)?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_IPV4_SHAPED = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")  # httpx's IPv4_STYLE_HOSTNAME


def _plain(value: object) -> bool:
    m = _PLAIN_URL.fullmatch(value) if isinstance(value, str) else None
    if m is None or m["port"] == _DEFAULT_PORTS[m["scheme"]]:
        return False
    if _IPV4_SHAPED.fullmatch(m["host"]):
        # httpx refuses an IPv4-shaped host that ipaddress.IPv4Address refuses: an octet
        # above 255, or one with a leading zero (the same rules, without that import).
        return all(
            p == "0" or (p[0] != "0" and len(p) <= 3 and int(p) <= 255)
            for p in m["host"].split(".")
        )
    return True


def endpoint(kind: str, value: str) -> tuple[str, str]:
    """``value`` as the URL httpx will use (``str(httpx.URL(value))``) and as it is shown
    in messages (``shown``), or ConfigError."""
    if _plain(value):
        return value, value  # no user:password in a plain URL
    import httpx

    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"{kind} URL {value!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"{kind} URL {value!r} must be http(s)://host[:port][/path]",
            hint="e.g. http://127.0.0.1:8791",
        )
    return str(url), shown(url)


def shown(url: httpx.URL) -> str:
    """The URL for messages and logs: without user:password, if it had one."""
    return str(url.copy_with(userinfo=b"")) if url.userinfo else str(url)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings every driver's client gets: httpx's default (certifi's CA
    bundle, hostname checked), built once. Each build parses ~150 CA certificates:
    ~20 ms and ~0.8 MB, four times over at start for four drivers otherwise."""
    import httpx

    return httpx.create_ssl_context(trust_env=False)


def own_client(client: httpx.Client | None) -> httpx.Client:
    # trust_env=False: a proxy picked up from the environment would be configuration
    # nobody wrote down, and would see the card data.
    if client is not None:
        return client
    import httpx

    return httpx.Client(trust_env=False, verify=tls_context())


def describe(exc: BaseException) -> str:
    # httpx messages carry the URL at most, never the body; scrub digit runs anyway.
    text = str(exc) or type(exc).__name__
    return DIGIT_RUNS.sub("<redacted>", f"{type(exc).__name__}: {text}")[:200]


class HttpDriver:
    """Lifecycle shared by the drivers: the client (made at the first call if none was
    given, closed by ``close`` if we made it); ``with`` support."""

    _http: httpx.Client | None
    _owns_client: bool
    _shown_url: str
    _client_lock: threading.Lock

    def _connect(self, kind: str, url: str, client: httpx.Client | None) -> str:
        """The checked URL (a ConfigError at start for a bad one, not at the first call)."""
        parsed, self._shown_url = endpoint(kind, url)
        self._owns_client = client is None
        self._http = client
        self._client_lock = threading.Lock()
        return parsed

    @property
    def _client(self) -> httpx.Client:
        client = self._http
        if client is None:
            with self._client_lock:  # request threads share a driver: one client
                if self._http is None:
                    self._http = own_client(None)
                client = self._http
        return client

    def close(self) -> None:
        if self._owns_client and self._http is not None:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown_url!r})"
