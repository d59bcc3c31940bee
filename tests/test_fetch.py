"""An image by URL, against real servers on real sockets: one on 127.0.0.2 (allowed through
U2SERVE_URL_ALLOW) serves a photo, redirects, an endless body, silence; others on 127.0.0.1,
127.0.0.3 and ::1 must never see a connection, whatever the URL, its spelling or its redirects.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.errors import FetchFailed
from service.http.app import Runtime, url_fetcher
from service.settings import Settings
from service.url.addresses import AllowList
from service.url.fetch import UrlFetcher

from .conftest import require_system_tool
from .test_api import assert_error, metric, photo, running, settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALLOWED = "127.0.0.2"
PHOTO = photo()  # horse.jpg, 770×595
MAX_BYTES = 1_000_000


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG of width×height: signature, IHDR, and the start of its pixel
    data (IDAT), which is where a decoder has read all it needs to know the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"IHDR" + ihdr
    chunk = struct.pack(">I", len(ihdr)) + body + struct.pack(">I", zlib.crc32(body))
    idat = struct.pack(">I", 800_000) + b"IDAT" + zlib.compress(b"\0" * 4096)[:64]
    return b"\x89PNG\r\n\x1a\n" + chunk + idat


class Upstream:
    """A plain HTTP/1.1 server on one address that records every connection and request head.

    Written on raw sockets so that it can misbehave: stall, send forever, never answer."""

    def __init__(self, host: str, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self.port = 0
        self.connections = 0
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str = "/photo.jpg") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            target = head.split(b" ", 2)[1].decode()
            await self.respond(target, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def respond(self, target: str, writer: asyncio.StreamWriter) -> None:
        def answer(status: str, body: bytes = b"", **headers: str) -> None:
            lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
            lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

        path, _, query = target.partition("?")
        if path == "/photo.jpg":
            answer("200 OK", PHOTO, Content_Type="image/jpeg")
        elif path == "/redirect":
            answer("302 Found", Location=query.removeprefix("to="))
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            answer("302 Found", Location=f"/chain/{left - 1}" if left else "/photo.jpg")
        elif path == "/endless":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
            while True:
                writer.write(b"\0" * 65536)
                await writer.drain()
        elif path == "/bomb":  # a 25 MP header, then the rest never comes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
            writer.write(b"Content-Length: 900000\r\n\r\n" + png_header(5000, 5000))
            await writer.drain()
            await asyncio.sleep(3600)
        elif path == "/silent":
            await asyncio.sleep(3600)
        elif path == "/page":
            answer("200 OK", b"<html>a page, not a photo</html>", Content_Type="text/html")
        elif path == "/big":
            answer("200 OK", b"\0" * (MAX_BYTES + 1), Content_Type="image/jpeg")
        else:
            answer("404 Not Found", b"nothing here", Content_Type="text/plain")
        await writer.drain()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def upstreams() -> AsyncIterator[dict[str, Upstream]]:
    """The allowed server, and the forbidden ones (each must stay unconnected)."""
    servers = {host: Upstream(host) for host in (ALLOWED, "127.0.0.1", "127.0.0.3", "::1")}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


def url_settings(weights: Path, **kw: Any) -> Settings:
    return settings(
        weights,
        url_allow=ALLOWED,
        url_connect_timeout_s=1,
        url_read_timeout_s=0.5,
        url_timeout_s=3,
        max_upload_bytes=MAX_BYTES,
        **kw,
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def service(
    u2netp_weights: Path, upstreams: dict[str, Upstream]
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    async with running(url_settings(u2netp_weights, max_pixels=4_000_000)) as (app, client):
        yield app.state.runtime, client


@pytest.fixture
def untouched(upstreams: dict[str, Upstream]) -> Callable[[], None]:
    """Asserts, when called, that no forbidden server saw a connection."""

    def check() -> None:
        seen = {h: s.connections for h, s in upstreams.items() if h != ALLOWED and s.connections}
        assert seen == {}, f"forbidden servers were connected to: {seen}"

    return check


async def by_url(client: httpx.AsyncClient, url: str, **params: str) -> httpx.Response:
    return await client.post("/segment", params={"url": url, **params})


# -- what is allowed ---------------------------------------------------------------------------


async def test_a_photo_by_url_is_the_upload_answer(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    untouched: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, client = service
    caplog.set_level(logging.INFO, logger="u2serve.access")
    up = await client.post(
        "/segment", content=PHOTO, headers={"content-type": "image/jpeg"}, params={"crop": "true"}
    )
    got = await by_url(client, upstreams[ALLOWED].url(), crop="true")
    assert got.status_code == 200, got.text
    assert got.content == up.content
    stages = [part.split(";")[0] for part in got.headers["server-timing"].split(", ")]
    # The fetched bytes are the upload's: their map is the one the upload left in the cache.
    assert stages == ["upload", "fetch", "decode", "cache", "encode", "total"]
    assert "cache;dur=" in got.headers["server-timing"]
    assert 'desc="hit"' in got.headers["server-timing"]
    # Also as a field of a form-encoded or of a multipart body.
    form = await client.post("/segment", data={"url": upstreams[ALLOWED].url(), "crop": "true"})
    assert form.status_code == 200, form.text
    assert form.content == up.content
    fields = {"url": upstreams[ALLOWED].url(), "crop": "true"}
    body = "".join(
        f'--b0undary\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    )
    multipart = await client.post(
        "/segment",
        content=(body + "--b0undary--\r\n").encode(),
        headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )
    assert multipart.status_code == 200, multipart.text
    assert multipart.content == up.content
    # A URL's answer has an image id, as an upload's has: asking again does not fetch again.
    fetched = upstreams[ALLOWED].connections
    by_id = await client.post(
        "/segment", params={"image_id": got.headers["x-image-id"], "crop": "true"}
    )
    assert by_id.status_code == 200, by_id.text
    assert by_id.content == up.content
    assert upstreams[ALLOWED].connections == fetched
    lines = [r.fields for r in caplog.records if r.name == "u2serve.access"]  # type: ignore[attr-defined]
    assert [(f["source"], f["status"]) for f in lines] == (
        [("upload", 200)] + [("url", 200)] * 3 + [("image_id", 200)]
    )
    assert lines[1]["bytes_in"] == len(PHOTO)
    assert lines[4]["bytes_in"] == 0
    text = (await client.get("/metrics")).text
    assert metric(text, "u2serve_requests_total", {"source": "url", "status": "200"}) == 3
    assert metric(text, "u2serve_stage_duration_seconds_count", {"stage": "fetch"}) == 3
    untouched()


async def test_redirects_are_followed_up_to_five(
    service: tuple[Runtime, httpx.AsyncClient], upstreams: dict[str, Upstream]
) -> None:
    _, client = service
    # /chain/N redirects N + 1 times before the photo.
    assert (await by_url(client, upstreams[ALLOWED].url("/chain/4"))).status_code == 200
    r = await by_url(client, upstreams[ALLOWED].url("/chain/5"))
    assert_error(r, 502, "fetch_failed")
    assert "more than 5" in r.json()["error"]["message"]


async def test_a_number_spelling_of_an_allowed_address_reaches_it(
    service: tuple[Runtime, httpx.AsyncClient], upstreams: dict[str, Upstream]
) -> None:
    _, client = service
    port = upstreams[ALLOWED].port
    for host in ("2130706434", "0x7f.0.0.2", "0177.2", "127.2"):
        r = await by_url(client, f"http://{host}:{port}/photo.jpg", output="box")
        assert r.status_code == 200, (host, r.text)


async def test_host_name_pinned_to_its_checked_address(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    untouched: Callable[[], None],
) -> None:
    """A resolver that rebinds (allowed first, forbidden after) is asked once per hop: the
    connection goes to the address that was checked, with the URL's own Host."""
    rt, client = service
    answers = {"photos.test": [[ALLOWED], ["127.0.0.3"], ["127.0.0.3"]]}
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> Sequence[str]:
        asked.append(host)
        return answers[host].pop(0)

    saved = rt.fetcher
    rt.fetcher = url_fetcher(rt.settings, resolver=rebinding)
    try:
        port = upstreams[ALLOWED].port
        r = await by_url(client, f"http://photos.test:{port}/photo.jpg", output="box")
    finally:
        rt.fetcher = saved
    assert r.status_code == 200, r.text
    assert asked == ["photos.test"]
    assert f"Host: photos.test:{port}\r\n".encode() in upstreams[ALLOWED].heads[-1]
    untouched()


# -- what is refused ---------------------------------------------------------------------------


INVALID = [
    "file:///etc/passwd",
    "gopher://127.0.0.2:70/_GET%20/",
    "ftp://127.0.0.2/photo.jpg",
    "dict://127.0.0.2:11211/stat",
    "http://user:secret@127.0.0.2/photo.jpg",
    "http://:secret@127.0.0.2/photo.jpg",
    "//127.0.0.2/photo.jpg",
    "not a url",
    "http:///photo.jpg",
    "http://1.2.3.4.5/",
    "http://0177.0.0.1/",  # httpx refuses a dotted quad with leading zeros outright
    "http://0x1.0x100000000/",
    "http://" + "a" * 2100 + ".test/",
]


@pytest.mark.parametrize("url", INVALID)
async def test_what_is_no_http_url_is_400(
    service: tuple[Runtime, httpx.AsyncClient], untouched: Callable[[], None], url: str
) -> None:
    _, client = service
    assert_error(await by_url(client, url), 400, "invalid_url")
    untouched()


def forbidden_urls(up: dict[str, Upstream]) -> dict[str, str]:
    port1, port3, port6 = up["127.0.0.1"].port, up["127.0.0.3"].port, up["::1"].port
    allowed = up[ALLOWED]
    return {
        "127.0.0.1": up["127.0.0.1"].url(),
        "127.0.0.3 (loopback not listed)": up["127.0.0.3"].url(),
        "localhost (the real resolver)": f"http://localhost:{port1}/photo.jpg",
        "decimal 2130706433": f"http://2130706433:{port1}/photo.jpg",
        "hexadecimal 0x7f000001": f"http://0x7f000001:{port1}/photo.jpg",
        "octal 0177.1": f"http://0177.1:{port1}/photo.jpg",
        "octal 017700000001": f"http://017700000001:{port1}/photo.jpg",
        "short 127.1": f"http://127.1:{port1}/photo.jpg",
        "0.0.0.0": f"http://0.0.0.0:{port1}/photo.jpg",
        "[::1]": up["::1"].url(),
        "[::]": f"http://[::]:{port6}/photo.jpg",
        "[::ffff:127.0.0.1]": f"http://[::ffff:127.0.0.1]:{port1}/photo.jpg",
        "[::ffff:7f00:3]": f"http://[::ffff:7f00:3]:{port3}/photo.jpg",
        "[64:ff9b::7f00:1] (NAT64)": f"http://[64:ff9b::7f00:1]:{port1}/photo.jpg",
        "[2002:7f00:1::] (6to4)": f"http://[2002:7f00:1::]:{port1}/photo.jpg",
        "169.254.169.254 (metadata)": "http://169.254.169.254/latest/meta-data/",
        "100.64.0.1 (shared)": "http://100.64.0.1/photo.jpg",
        "10.0.0.1 (private)": "http://10.0.0.1/photo.jpg",
        "[fd00::1] (unique local)": "http://[fd00::1]/photo.jpg",
        "[fe80::1] (link-local)": "http://[fe80::1]/photo.jpg",
        "224.0.0.1 (multicast)": "http://224.0.0.1/photo.jpg",
        "redirect to 127.0.0.1": allowed.url(f"/redirect?to={up['127.0.0.1'].url()}"),
        "redirect to [::1]": allowed.url(f"/redirect?to={up['::1'].url()}"),
        "redirect to metadata": allowed.url("/redirect?to=http://169.254.169.254/latest/"),
        "redirect to 192.168.1.1": allowed.url("/redirect?to=http://192.168.1.1/photo.jpg"),
        "redirect to 10.1.2.3 by number": allowed.url("/redirect?to=http://167838211/"),
    }


FORBIDDEN_CASES = list(
    forbidden_urls({h: Upstream(h) for h in (ALLOWED, "127.0.0.1", "127.0.0.3", "::1")})
)


@pytest.mark.parametrize("case", FORBIDDEN_CASES)
async def test_forbidden_addresses_are_403_and_never_connected(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    untouched: Callable[[], None],
    case: str,
) -> None:
    _, client = service
    r = await by_url(client, forbidden_urls(upstreams)[case])
    assert_error(r, 403, "url_forbidden")
    untouched()


async def test_redirect_to_another_scheme_is_refused(
    service: tuple[Runtime, httpx.AsyncClient], upstreams: dict[str, Upstream]
) -> None:
    _, client = service
    r = await by_url(client, upstreams[ALLOWED].url("/redirect?to=file:///etc/passwd"))
    assert_error(r, 400, "invalid_url")
    assert "redirects to" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("resolved", "why"),
    [
        (["10.1.2.3"], "private"),
        (["127.0.0.3"], "loopback"),
        ([ALLOWED, "127.0.0.3"], "loopback"),  # one bad address among good ones spoils them
        (["fe80::1%2"], "link-local"),
        (["::ffff:169.254.169.254"], "IPv4-mapped"),
    ],
)
async def test_a_name_resolving_to_a_forbidden_address_is_403(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    untouched: Callable[[], None],
    resolved: list[str],
    why: str,
) -> None:
    rt, client = service

    async def resolver(host: str, port: int) -> Sequence[str]:
        return resolved

    saved = rt.fetcher
    rt.fetcher = url_fetcher(rt.settings, resolver=resolver)
    try:
        port = upstreams["127.0.0.3"].port
        r = await by_url(client, f"http://internal.test:{port}/photo.jpg")
    finally:
        rt.fetcher = saved
    assert_error(r, 403, "url_forbidden")
    message = r.json()["error"]["message"]
    assert why in message
    assert "internal.test resolves to" in message
    assert not any(a in message for a in resolved)  # the address itself is not told
    untouched()


@pytest.mark.parametrize(
    ("path", "status", "code", "needle"),
    [
        ("/big", 413, "image_too_large", "1000001 bytes"),
        ("/endless", 413, "image_too_large", "over the limit"),
        ("/bomb", 413, "image_too_large", "5000×5000"),  # from the header, before the rest
        ("/page", 415, "unsupported_image", "text/html"),
        ("/missing", 502, "fetch_failed", "404 Not Found"),
        ("/silent", 504, "fetch_timeout", "reading from"),
    ],
)
async def test_what_arrives_is_judged(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    path: str,
    status: int,
    code: str,
    needle: str,
) -> None:
    _, client = service
    r = await by_url(client, upstreams[ALLOWED].url(path))
    assert_error(r, status, code)
    assert needle in r.json()["error"]["message"]


async def test_unreachable_and_unresolvable_hosts_are_502(
    service: tuple[Runtime, httpx.AsyncClient],
) -> None:
    rt, client = service
    closed = socket.socket()
    closed.bind((ALLOWED, 0))  # bound, never listening: the connection is refused
    try:
        port = closed.getsockname()[1]
        assert_error(await by_url(client, f"http://{ALLOWED}:{port}/x"), 502, "fetch_failed")
    finally:
        closed.close()

    async def nxdomain(host: str, port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    saved = rt.fetcher
    rt.fetcher = url_fetcher(rt.settings, resolver=nxdomain)
    try:
        r = await by_url(client, "http://no-such-host.test/photo.jpg")
    finally:
        rt.fetcher = saved
    assert_error(r, 502, "fetch_failed")
    assert "could not be resolved" in r.json()["error"]["message"]


async def test_a_resolver_that_hangs_is_a_504(service: tuple[Runtime, httpx.AsyncClient]) -> None:
    rt, client = service

    async def hangs(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(3600)
        return []

    saved = rt.fetcher
    rt.fetcher = url_fetcher(rt.settings.model_copy(update={"url_timeout_s": 0.3}), hangs)
    try:
        r = await by_url(client, "http://slow-dns.test/photo.jpg")
    finally:
        rt.fetcher = saved
    assert_error(r, 504, "fetch_timeout")


async def test_image_and_url_together_or_a_bad_model_are_422(
    service: tuple[Runtime, httpx.AsyncClient], upstreams: dict[str, Upstream]
) -> None:
    _, client = service
    r = await client.post(
        "/segment",
        params={"url": upstreams[ALLOWED].url()},
        content=PHOTO,
        headers={"content-type": "image/jpeg"},
    )
    assert_error(r, 422, "invalid_parameter")
    assert "image, url" in r.json()["error"]["message"]
    # A url and an image id: two sources again, in the query, a form or a multipart body.
    image_id = (await client.post("/segment", content=PHOTO)).headers["x-image-id"]
    both = {"url": upstreams[ALLOWED].url(), "image_id": image_id}
    for r in (
        await client.post("/segment", params=both),
        await client.post("/segment", data=both),
        await client.post("/segment", files={k: (None, v) for k, v in both.items()}),
        await client.post("/segment", params={"url": both["url"]}, data={"image_id": image_id}),
    ):
        assert_error(r, 422, "invalid_parameter")
        assert "url, image_id" in r.json()["error"]["message"]
    r = await client.post("/segment", params={"url": upstreams[ALLOWED].url(), "model": "u2"})
    assert_error(r, 422, "invalid_parameter")
    assert "u2netp" in r.json()["error"]["message"]


async def test_the_service_is_healthy_after_every_attack(
    service: tuple[Runtime, httpx.AsyncClient],
    upstreams: dict[str, Upstream],
    untouched: Callable[[], None],
) -> None:
    """Run last in this module: every refusal above was counted by its code, and nothing is
    held or queued."""
    rt, client = service
    assert (await client.get("/readyz")).status_code == 200
    assert (await by_url(client, upstreams[ALLOWED].url())).status_code == 200
    text = (await client.get("/metrics")).text
    for code in ("invalid_url", "url_forbidden", "fetch_failed", "fetch_timeout"):
        assert metric(text, "u2serve_rejected_total", {"reason": code}) >= 1, code
    assert metric(text, "u2serve_memory_held_bytes") == 0
    assert metric(text, "u2serve_queue_depth") == 0
    assert rt.budget is not None
    assert rt.budget.held_bytes == 0
    untouched()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed key and certificate for the name photos.test."""
    openssl = require_system_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=photos.test"),
            *("-addext", "subjectAltName=DNS:photos.test"),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


async def test_tls_is_verified_for_the_url_host_on_the_pinned_address(
    certificate: tuple[Path, Path],
) -> None:
    """The connection goes to the checked address, while SNI and the certificate's check use
    the URL's host name: a certificate for another name fails."""
    key, cert = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    client_tls = ssl.create_default_context(cafile=str(cert))
    up = Upstream(ALLOWED, tls=server_tls)
    await up.start()

    async def resolver(host: str, port: int) -> Sequence[str]:
        return [ALLOWED]  # every name: to the one server

    fetcher = UrlFetcher(
        AllowList.parse([ALLOWED]),
        connect_timeout_s=2,
        read_timeout_s=2,
        total_timeout_s=5,
        resolver=resolver,
        ssl_context=client_tls,
    )
    try:
        got = await fetcher.fetch(f"https://photos.test:{up.port}/photo.jpg", max_bytes=MAX_BYTES)
        assert got.data == PHOTO
        assert names == ["photos.test"]
        assert f"Host: photos.test:{up.port}\r\n".encode() in up.heads[-1]
        with pytest.raises(FetchFailed, match="certificate"):
            await fetcher.fetch(f"https://other.test:{up.port}/photo.jpg", max_bytes=MAX_BYTES)
        assert names[-1] == "other.test"
        assert len(up.heads) == 1  # nothing was sent over the connection that failed its check
    finally:
        await up.stop()


async def test_url_input_off(u2netp_weights: Path, upstreams: dict[str, Upstream]) -> None:
    async with running(url_settings(u2netp_weights, url_input=False)) as (_, client):
        r = await by_url(client, upstreams[ALLOWED].url())
        assert_error(r, 422, "invalid_parameter")
        assert "does not fetch images by URL" in r.json()["error"]["message"]
        spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/segment"]["post"]
    assert "url" not in {p["name"] for p in op["parameters"]}
    assert "403" not in op["responses"]
