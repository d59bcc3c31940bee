"""The image's way in by URL: ``UrlFetcher.fetch(url)`` → its bytes, safe against server-side
request forgery.

- Only ``http`` and ``https``, without credentials; a host written as a number in any spelling
  (``2130706433``, ``0x7f.1``) is read as the address it is.
- The host is resolved once, and every address it resolves to is judged
  (:mod:`service.url.addresses`); one refused address refuses the URL, so a name that mixes a
  public and a private address cannot be used either.
- The connection goes to the addresses that were judged and to nothing else: the network
  backend that httpcore connects through knows only those, so a second resolution (DNS
  rebinding) never happens. TLS (SNI, certificate verification) and ``Host`` use the URL's own
  host name.
- At most :data:`MAX_REDIRECTS` redirects, each target parsed, resolved and judged the same way.
- The body is streamed within a byte limit, and a probe is given what has arrived as it grows,
  so the image's header (its pixel count) is judged before the rest is downloaded; connect,
  read (silence) and total timeouts.

httpcore (the engine under httpx) makes the requests; httpx parses the URLs, imported with the
first URL: where NNCF's rich and pygments are installed (the fetch's converters), importing httpx
imports its command line too, 0.16 s of every start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpcore

from service.errors import (
    FetchFailed,
    FetchTimeout,
    ImageTooLarge,
    InvalidUrl,
    UnsupportedImage,
    UrlForbidden,
)
from service.url.addresses import AllowList, IPAddress, ipv4_literal, judge

if TYPE_CHECKING:
    import httpx

__all__ = ["MAX_REDIRECTS", "MAX_URL_LENGTH", "Fetched", "Probe", "Resolver", "UrlFetcher"]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_URL_LENGTH = 2048
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = b"u2serve (image by URL)"
# The probe sees the first bytes that come, then the body each time it has grown eight times
# (and by a kilobyte at least), until it has read the header: a handful of header reads for a
# body of any size, and a PNG's 33 bytes of header judged as soon as they are there.
_PROBE_GROWTH = 8
_PROBE_STEP = 1024

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port)`` → the addresses the host name resolves to (raises ``OSError`` if none)."""
Probe = Callable[[bytes], Awaitable[bool]]
"""Given the body so far: True once it has judged the image's header (no more calls), False
to be called again with more; it raises to stop the download (e.g. too many pixels)."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver, off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # where it came from, after redirects
    redirects: int


def parse_url(url: str, *, redirected_from: str | None = None) -> httpx.URL:
    """The URL if it is one the service may try; 400 ``invalid_url`` otherwise."""
    import httpx

    where = f"the URL redirects to {url[:200]!r}, which" if redirected_from else "the URL"
    if len(url) > MAX_URL_LENGTH:
        raise InvalidUrl(f"the URL is {len(url)} characters long; at most {MAX_URL_LENGTH}")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidUrl(f"{where} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        scheme = f"{parsed.scheme}:" if parsed.scheme else "no scheme"
        raise InvalidUrl(f"{where} has {scheme}; only http and https URLs are fetched")
    if parsed.userinfo:
        raise InvalidUrl(f"{where} holds credentials (user:password@); they are not sent")
    if not parsed.raw_host:
        raise InvalidUrl(f"{where} has no host")
    try:
        ipv4_literal(parsed.raw_host.decode("ascii"))
    except ValueError as exc:
        raise InvalidUrl(f"{where} has an invalid host: {exc}") from None
    return parsed


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects one host name to the addresses judged for it, and refuses anything else."""

    def __init__(self, host: str, addresses: Sequence[str]) -> None:
        self._host = host
        self._addresses = addresses
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: object = None,
    ) -> httpcore.AsyncNetworkStream:
        if host != self._host:
            raise httpcore.ConnectError(f"{host} was not checked")
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address
                )
            except httpcore.ConnectError as exc:  # the next address may answer
                failure = exc
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: object = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


class UrlFetcher:
    """Fetches images by URL for the service; see the module's docstring for the rules."""

    def __init__(
        self,
        allow: AllowList,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float,
        max_redirects: int = MAX_REDIRECTS,
        resolver: Resolver = system_resolver,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.allow = allow
        self.total_timeout_s = total_timeout_s
        self.max_redirects = max_redirects
        self._timeouts = {
            "connect": connect_timeout_s,
            "read": read_timeout_s,
            "write": read_timeout_s,
            "pool": connect_timeout_s,
        }
        self._resolve = resolver
        self._ssl = ssl_context

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:  # loading the CA bundle takes milliseconds: once, when first used
            import httpx

            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def fetch(self, url: str, *, max_bytes: int, probe: Probe | None = None) -> Fetched:
        """The body of ``url``, within ``max_bytes``; 400/403/413/415/502/504 as documented."""
        target = parse_url(url)
        try:
            async with asyncio.timeout(self.total_timeout_s):
                for hop in range(self.max_redirects + 1):
                    addresses = await self._addresses(target)
                    got = await self._get(target, addresses, max_bytes, probe)
                    if isinstance(got, bytes):
                        return Fetched(got, str(target), hop)
                    target = parse_url(str(got), redirected_from=str(target))
        except TimeoutError:
            raise FetchTimeout(
                f"fetching the URL took longer than {self.total_timeout_s:g} s"
            ) from None
        raise FetchFailed(f"the URL redirects more than {self.max_redirects} times")

    async def _addresses(self, url: httpx.URL) -> list[str]:
        """The addresses to connect to for ``url``: all of them judged, or 403."""
        host = url.raw_host.decode("ascii")
        literal: IPAddress | None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = ipv4_literal(host)  # parse_url has refused what raises here
        if literal is not None:
            found: list[IPAddress] = [literal]
        else:
            try:
                port = url.port or (443 if url.scheme == "https" else 80)
                names = await self._resolve(host, port)
            except OSError as exc:
                raise FetchFailed(f"the host {host} could not be resolved ({exc})") from None
            # A scope (fe80::1%eth0) belongs to link-local addresses, which are refused anyway.
            found = [ipaddress.ip_address(a.split("%")[0]) for a in dict.fromkeys(names)]
            if not found:
                raise FetchFailed(f"the host {host} has no address")
        for address in found:
            verdict = judge(address, host, self.allow)
            if not verdict.allowed:
                log.info("url refused: %s → %s (%s)", host, address, verdict.why)
                # The address a name resolves to is not told: it would map a private network.
                subject = f"{host} resolves to" if literal is None else f"{address} is"
                raise UrlForbidden(
                    f"{subject} a {verdict.why} address, which this service does not fetch from"
                )
        return [str(a) for a in found]

    async def _get(
        self, url: httpx.URL, addresses: list[str], max_bytes: int, probe: Probe | None
    ) -> bytes | httpx.URL:
        """One request: the body, or where a redirect points."""
        host = url.raw_host.decode("ascii")
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._ssl_context() if url.scheme == "https" else None,
            network_backend=_PinnedBackend(host, addresses),
            max_connections=1,
            retries=0,
        )
        request_url = httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        )
        headers = [
            (b"Host", url.netloc),
            (b"User-Agent", _USER_AGENT),
            (b"Accept", b"image/*"),
            (b"Accept-Encoding", b"identity"),
        ]
        try:
            async with (
                pool,
                pool.stream(
                    b"GET", request_url, headers=headers, extensions={"timeout": self._timeouts}
                ) as response,
            ):
                if response.status in _REDIRECTS:
                    location = _header(response.headers, b"location")
                    if not location:
                        raise FetchFailed(f"the URL answered {response.status} with no Location")
                    return url.join(location)
                if response.status not in (200, 203):
                    reason = response.extensions.get("reason_phrase", b"").decode("latin-1")
                    raise FetchFailed(f"the URL answered {response.status} {reason}".rstrip())
                return await self._body(response, max_bytes, probe)
        except httpcore.TimeoutException as exc:
            what = "connecting to" if isinstance(exc, httpcore.ConnectTimeout) else "reading from"
            raise FetchTimeout(f"timed out {what} the URL's server ({host})") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise FetchFailed(f"could not fetch the URL from {host}: {reason}") from None

    @staticmethod
    async def _body(response: httpcore.Response, max_bytes: int, probe: Probe | None) -> bytes:
        headers = response.headers
        encoding = _header(headers, b"content-encoding")
        if encoding and encoding.lower() != "identity":
            raise FetchFailed(f"the URL's server sent a {encoding} body although asked for none")
        kind = (_header(headers, b"content-type") or "").split(";")[0].strip().lower()
        if kind.startswith("text/"):
            raise UnsupportedImage(f"the URL answered {kind}, not an image")
        declared = _header(headers, b"content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ImageTooLarge(f"the URL's image is {declared} bytes; the limit is {max_bytes}")
        body = bytearray()
        next_probe = 1
        async for chunk in response.aiter_stream():
            body += chunk
            if len(body) > max_bytes:
                raise ImageTooLarge(f"the URL's image is over the limit of {max_bytes} bytes")
            if probe is not None and len(body) >= next_probe:
                if await probe(bytes(body)):
                    probe = None
                next_probe = max(_PROBE_GROWTH * len(body), len(body) + _PROBE_STEP)
        return bytes(body)
