"""Helpers for tests that start real server processes: ports, start-up, readiness."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import REPO, reference_dir


def distinct_photos(n: int) -> list[bytes]:
    """``n`` different small JPEG photos: the same one again could be answered from the map
    cache."""
    with Image.open(reference_dir() / "images" / "horse.jpg") as im:
        rgb = im.convert("RGB")
    out = []
    for i in range(n):
        buf = io.BytesIO()
        rgb.resize((200 + i, 150)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def poll_ready(url: str, died: Callable[[], str | None], limit_s: float = 120) -> None:
    """Wait for ``url``/readyz to answer 200; ``died`` returns a reason when the server is gone."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        reason = died()
        if reason is not None:
            pytest.fail(reason)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not become ready within {limit_s:.0f} s")


def wait_ready(url: str, proc: subprocess.Popen[bytes], limit_s: float = 120) -> None:
    def died() -> str | None:
        if proc.poll() is None:
            return None
        out = proc.stdout.read().decode() if proc.stdout else ""
        return f"server exited with {proc.returncode}:\n{out}"

    poll_ready(url, died, limit_s)


def scrape(url: str) -> dict[str, float]:
    """A service's metrics, each series summed over its labels."""
    totals: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = series.split("{")[0]
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def u2netp_env(weights: Path, **settings: str) -> dict[str, str]:
    """A quick server: U2NETP on the CPU, each batch taken at once, plus ``settings``."""
    base = {
        "U2SERVE_MODEL": "u2netp",
        "U2SERVE_WEIGHTS": str(weights),
        "U2SERVE_DEVICE": "cpu",
        "U2SERVE_MAX_BATCH_WAIT_MS": "0",
    }
    return base | settings


@contextmanager
def serving(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real server process with ``env``, ready; killed afterwards if still running."""
    port = free_port()
    proc = start(env, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # also closes the pipe


@contextmanager
def serving_gated(
    env: dict[str, str], gate: Path, limit_s: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real server process with ``env`` whose batches wait for the file ``gate``
    (tests/gated_service.py), ready within ``limit_s``; afterwards the gate is opened and the
    server drained."""
    port = free_port()
    address = ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gated_service", str(gate), *address],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, limit_s)
        yield proc, url
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=30)


@contextmanager
def file_server(host: str, files: Mapping[str, tuple[bytes, str]]) -> Iterator[str]:
    """A plain HTTP server on ``host`` (a loopback address a service is told it may fetch from)
    answering each path of ``files`` with its (bytes, content type), 404 otherwise; yields its
    base URL and records nothing."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, ctype = files.get(self.path.split("?")[0], (b"nothing here", "text/plain"))
            self.send_response(200 if self.path.split("?")[0] in files else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
