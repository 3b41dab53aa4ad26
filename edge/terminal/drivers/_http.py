"""What every HTTP driver of the terminal shares (acquirer, card reader, printer, link):
URL checks, client ownership, lifecycle, and error text scrubbed of anything that could
be a card number."""

from __future__ import annotations

import functools
import re
import ssl
from types import TracebackType
from typing import Self

import httpx

from edge.errors import ConfigError

#: A run of digits as long as a PAN: never let one into a message or a log line.
DIGIT_RUNS = re.compile(r"\d{12,19}")


def endpoint(kind: str, value: str) -> httpx.URL:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"{kind} URL {value!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"{kind} URL {value!r} must be http(s)://host[:port][/path]",
            hint="e.g. http://127.0.0.1:8791",
        )
    return url


def shown(url: httpx.URL) -> str:
    """The URL for messages and logs: without user:password, if it had one."""
    return str(url.copy_with(userinfo=b"")) if url.userinfo else str(url)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings every driver's client gets: httpx's default (certifi's CA
    bundle, hostname checked), built once. Each build parses ~150 CA certificates:
    ~20 ms and ~0.8 MB, four times over at start for four drivers otherwise."""
    return httpx.create_ssl_context(trust_env=False)


def own_client(client: httpx.Client | None) -> httpx.Client:
    # trust_env=False: a proxy picked up from the environment would be configuration
    # nobody wrote down, and would see the card data.
    if client is not None:
        return client
    return httpx.Client(trust_env=False, verify=tls_context())


def describe(exc: BaseException) -> str:
    # httpx messages carry the URL at most, never the body; scrub digit runs anyway.
    text = str(exc) or type(exc).__name__
    return DIGIT_RUNS.sub("<redacted>", f"{type(exc).__name__}: {text}")[:200]


class HttpDriver:
    """Lifecycle shared by the drivers: close the client if we made it; ``with`` support."""

    _client: httpx.Client
    _owns_client: bool
    _shown_url: str

    def _connect(self, kind: str, url: str, client: httpx.Client | None) -> httpx.URL:
        parsed = endpoint(kind, url)
        self._shown_url = shown(parsed)
        self._owns_client = client is None
        self._client = own_client(client)
        return parsed

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

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
