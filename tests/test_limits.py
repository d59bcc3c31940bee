"""Load and hostile clients against a real server process: the memory budget under a burst of
large images, memory given back after it, slow clients, oversized bodies, too many connections."""

from __future__ import annotations

import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import REPO, reference_dir
from .procs import serving, u2netp_env

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BUDGET = 300 * MiB
TIMEOUT_S = 3.0  # body and header timeouts of the server under test
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def server(u2netp_weights: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = u2netp_env(
        u2netp_weights,
        U2SERVE_MAX_BATCH_SIZE="1",
        U2SERVE_CODEC_THREADS="2",
        U2SERVE_REQUEST_TIMEOUT_S="120",  # the burst is answered 200 or 503, never 504
        U2SERVE_MEMORY_BUDGET_BYTES=str(BUDGET),
        U2SERVE_BODY_TIMEOUT_S=str(TIMEOUT_S),
        U2SERVE_HEADER_TIMEOUT_S=str(TIMEOUT_S),
        U2SERVE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    with serving(env) as (proc, url):
        yield proc, url


def _status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRss:
    """The process's peak RSS over a block: the kernel's high-water mark, reset at the start
    (``clear_refs``), and a 5 ms poll of RSS besides in case the reset is not allowed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status(self.pid, "VmRSS"))

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm = True
        except OSError:
            self._hwm = False
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm:
            self.peak = max(self.peak, _status(self.pid, "VmHWM"))


def flat_png(width: int, height: int) -> bytes:
    """A one-colour photo-sized PNG: tens of kB on the wire, width×height×3 bytes decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (180, 120, 60)).save(buf, "PNG")
    return buf.getvalue()


def post(url: str, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/segment",
        content=data,
        params=params,
        headers={"content-type": "image/png"},
        timeout=180,
    )


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    time.sleep(seconds)  # the service gives memory back once the last request is answered
    return _status(pid, "VmRSS")


def test_burst_of_large_images_stays_within_the_budget(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = server
    image = flat_png(3264, 2448)  # 8 MP: charged 80 MB for a mask, so three fit in the budget
    assert len(image) < 100_000
    n = 24  # held at once, their RGB alone (24 × 24 MB) would be twice the budget

    def burst() -> list[httpx.Response]:
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: post(url, image), range(n)))

    # One burst first, so that what the first one leaves for good is in the baseline: since
    # the maps are finished in the codec threads, one run in three kept 25-33 MiB after it
    # (the codecs' per-thread buffers) and never more after the next bursts.
    burst()
    before = settle_rss(proc.pid)
    # The model's own working memory: the peak while it segments a small image.
    with PeakRss(proc.pid) as model:
        assert post(url, flat_png(320, 320)).status_code == 200
    model_bytes = model.peak - before
    with PeakRss(proc.pid) as rss:
        responses = burst()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 2, codes
    assert codes.count(503) >= 1, codes  # the burst was over the budget
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
    # The charges (10 bytes a pixel for a mask, twice the bytes of a body) are set above the
    # measured peak (8.6), so the process never goes past its baseline, the model's working
    # memory and the budget; 32 MiB is for what is not charged: the answers' bytes, headers,
    # the connections' buffers and the allocator's slack.
    assert rss.peak - before <= model_bytes + BUDGET + 32 * MiB, (
        f"peak RSS {(rss.peak - before) / MiB:.0f} MiB over the {before / MiB:.0f} MiB before "
        f"the burst; model {model_bytes / MiB:.0f} MiB, budget {BUDGET / MiB:.0f} MiB"
    )
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'u2serve_rejected_total{reason="memory_full"}' in metrics
    assert "u2serve_memory_held_bytes 0.0" in metrics
    # Memory is given back: the large buffers are mapped (service/core/budget.py), so the RSS
    # settles
    # where it was (measured +1.0 to +6.4 MiB in six runs; up to +61 MiB before they were;
    # after a first burst, +4 to +11 MiB in six).
    # Given back once the process is idle, by the codec pool: waited for, however busy the machine.
    end = time.monotonic() + 120
    while (after := settle_rss(proc.pid)) - before > 24 * MiB and time.monotonic() < end:
        pass
    assert after - before <= 24 * MiB, f"RSS {before / MiB:.0f} → {after / MiB:.0f} MiB"
    # And the working buffers kept for the next request (model/scratch.py) are freed with it.
    while (
        "u2serve_kept_buffers_bytes 0.0"
        not in (metrics := httpx.get(f"{url}/metrics", timeout=5).text)
        and time.monotonic() < end
    ):
        time.sleep(0.1)
    assert "u2serve_kept_buffers_bytes 0.0" in metrics


def test_an_image_over_the_whole_budget_is_413(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = server
    # 20 MP × 24 bytes (a WebP cut-out) > 300 MiB
    r = post(url, flat_png(5000, 4000), output="cutout", format="webp")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "image_too_large"
    assert "memory budget" in r.json()["error"]["message"]


def test_a_60_mb_raw_body_gets_the_413_json(server: tuple[subprocess.Popen[bytes], str]) -> None:
    """From a plain HTTP client that sends the whole body before it reads the answer."""
    _, url = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/segment", body=b"\0" * 60_000_000, headers={"Content-Type": "image/png"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status == 413
    assert body["error"]["code"] == "image_too_large"


def test_a_client_still_sending_gets_the_413_not_a_reset(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    """A client that keeps sending its 60 MB body while the 413 is answered. Without the
    service's lingering close, 14 of 20 such clients got a connection reset instead of the
    answer here; 5 in a row all reading it by chance would be a 1-in-400 event."""
    _, url = server
    for _ in range(5):
        sock = _raw_connection(url)
        sock.sendall(
            b"POST /segment HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            b"Content-Length: 60000000\r\n\r\n"
        )

        def blast(sock: socket.socket = sock) -> None:
            try:
                for _ in range(60_000_000 // 65536):
                    sock.sendall(bytes(65536))
            except OSError:
                return

        sender = threading.Thread(target=blast, daemon=True)
        sender.start()
        status, _, body = _read_answer(sock)
        sender.join(10)
        sock.close()
        assert status == 413
        assert json.loads(body)["error"]["code"] == "image_too_large"


def test_expect_100_continue_gets_413_without_sending_the_body(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = server
    sock = _raw_connection(url)
    sock.sendall(
        b"POST /segment HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        b"Content-Length: 60000000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    status, _, body = _read_answer(sock)  # no 100 Continue first: the body is never asked for
    sock.close()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "image_too_large"


def _raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_trickled_body_gets_408_while_others_are_served(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = server
    sock = _raw_connection(url)
    sock.sendall(
        b"POST /segment HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            try:
                sock.sendall(b"\xff")
            except OSError:
                return

    t0 = time.monotonic()
    threading.Thread(target=trickle, daemon=True).start()
    photo = (reference_dir() / "images" / "horse.jpg").read_bytes()
    served = httpx.post(
        f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=30
    )
    assert served.status_code == 200  # while the slow client holds its connection
    status, headers, body = _read_answer(sock)
    elapsed = time.monotonic() - t0
    stop.set()
    sock.close()
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    # Not sooner than the limit; how much later depends on the machine's load, not the code.
    assert elapsed >= TIMEOUT_S - 0.5, elapsed


def test_trickled_headers_get_408(server: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = server
    sock = _raw_connection(url)
    t0 = time.monotonic()
    sock.sendall(b"POST /segment HTTP/1.1\r\n")
    for _ in range(int(TIMEOUT_S / 0.5) + 4):
        try:
            sock.sendall(b"X-Slow: y\r\n")
        except OSError:
            break
        time.sleep(0.5)
    status, _, body = _read_answer(sock)
    sock.close()
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 >= TIMEOUT_S - 0.5  # the limit, however late the answer came


def test_connections_over_the_limit_get_503_json(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = server
    idle = [_raw_connection(url) for _ in range(MAX_CONNECTIONS)]
    try:
        # Once the server has taken them all (at once on a quiet machine, later under load).
        r = _livez_until(url, 503)
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
    finally:
        for s in idle:
            s.close()
    _livez_until(url, 200)  # once the server has seen them closed


def _livez_until(url: str, status: int, limit_s: float = 120) -> httpx.Response:
    """``/livez``'s answer once it has ``status``; only a failing server takes ``limit_s``."""
    end = time.monotonic() + limit_s
    while (r := httpx.get(f"{url}/livez", timeout=30)).status_code != status:
        assert time.monotonic() < end, f"/livez still answers {r.status_code}, not {status}"
        time.sleep(0.05)
    return r


# -- the budget on its own -----------------------------------------------------------------------


def test_budget_admits_what_fits_and_gives_back() -> None:
    from service.core.budget import MemoryBudget
    from service.errors import ImageTooLarge, QueueFull
    from service.metrics import Metrics

    idle: list[int] = []
    budget = MemoryBudget(
        100, metrics=Metrics(), retry_after=lambda: 7, on_idle=lambda: idle.append(1)
    )
    with budget.hold(60):
        with pytest.raises(QueueFull) as full, budget.hold(41):
            pass
        assert full.value.headers == {"Retry-After": "7"}
        with budget.hold(40):
            assert budget.held_bytes == 100
        assert idle == []
    assert budget.held_bytes == 0
    assert idle == [1]  # memory is given back once nothing is held
    with pytest.raises(ImageTooLarge), budget.hold(101):
        pass
    with pytest.raises(RuntimeError), budget.hold(50):
        raise RuntimeError("a failed request releases its charge too")
    assert budget.held_bytes == 0


glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting"
)


def _allocator_child(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``code`` run by a new Python with glibc's allocator settings of ``env`` and no others."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))} | env,
        capture_output=True,
        text=True,
        check=True,
    )


_MAPPED_CHILD = """
import numpy as np
from service.core.budget import map_large_buffers

print(map_large_buffers())
np.ones(30 << 20, np.uint8)  # mapped and freed: glibc's moving threshold rises to 30 MiB
block = np.ones(8 << 20, np.uint8)
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
lo, hi = (int(x, 16) for x in heap.split()[0].split("-"))
print(not lo <= block.ctypes.data < hi)
"""


@glibc_only
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "True\nTrue"),  # an 8 MiB block is mapped, not carved from the heap
        ({"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}, "False\nFalse"),  # the operator's wins
        ({"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={64 << 20}"}, "False\nFalse"),
    ],
)
def test_large_buffers_are_mapped_unless_the_operator_set_a_threshold(
    env: dict[str, str], expected: str
) -> None:
    assert _allocator_child(_MAPPED_CHILD, env).stdout.strip() == expected


_TRIM_CHILD = """
import numpy as np
from service.core.budget import give_back_memory, map_large_buffers

def top():
    heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
    return int(heap.split()[0].split("-")[1], 16)

map_large_buffers()
give_back_memory()  # no free space left at the top, which the imports may have left there
before = top()
# 1 MiB blocks, below the mapping threshold, until the heap's top has grown by 6 MiB: holes lower
# in the heap take the first ones, wherever the imports left them.
blocks = []
while top() - before < 6 << 20 and len(blocks) < 64:
    blocks.append(np.ones(1 << 20, np.uint8))
grown = top()
del blocks  # 6 MiB free at the heap's top
kept = top()
give_back_memory()
print(grown - before >= 6 << 20, kept == grown, top() < grown - (4 << 20))
"""


@glibc_only
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # Kept while requests run, so the next request's arrays are not faulted in afresh;
        # given back once the budget is idle.
        ({}, "True True True"),
        # glibc's fixed 128 KiB without our threshold: the top is given back at once.
        ({"MALLOC_TRIM_THRESHOLD_": str(128 << 10)}, "True False True"),
    ],
)
def test_a_heaps_top_is_kept_while_busy_and_given_back_when_idle(
    env: dict[str, str], expected: str
) -> None:
    assert _allocator_child(_TRIM_CHILD, env).stdout.strip() == expected


_ARENAS_CHILD = """
import ctypes, threading
from service.core.budget import limit_arenas

print(limit_arenas(2))
barrier = threading.Barrier(6)

def work():
    block = bytearray(4096)  # a thread's first malloc gives it an arena
    barrier.wait()  # all six alive at once, so none takes over an arena a finished one left

threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" line each, on stderr
"""


@glibc_only
@pytest.mark.parametrize(
    ("env", "took", "arenas"),
    [
        ({}, "True", 2),  # without the limit: 7, the main one and one a thread
        ({"MALLOC_ARENA_MAX": "4"}, "False", 4),  # the operator's wins
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=3"}, "False", 3),
    ],
)
def test_threads_share_one_arena_a_core_unless_the_operator_set_a_limit(
    env: dict[str, str], took: str, arenas: int
) -> None:
    out = _allocator_child(_ARENAS_CHILD, env)
    assert out.stdout.strip() == took
    assert sum(line.startswith("Arena ") for line in out.stderr.splitlines()) == arenas
