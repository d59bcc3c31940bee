"""``python -m service`` as a real process, over a real socket."""

from __future__ import annotations

import http.client
import io
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model.engines import cpu_features, float32_cpu_engine

from .conftest import reference_dir
from .procs import free_port, scrape, serving, start, u2netp_env

pytestmark = pytest.mark.integration


@pytest.fixture
def server(u2netp_weights: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = u2netp_env(u2netp_weights, U2SERVE_MAX_BATCH_SIZE="1")
    with serving(env) as (proc, url):
        yield proc, url


def begun(url: str, photo: bytes) -> http.client.HTTPConnection:
    """A /segment request with its headers and half of its body sent; the rest is the caller's."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("POST", "/segment")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(len(photo)))
    conn.endheaders(photo[: len(photo) // 2])
    return conn


def test_sigterm_answers_everything_accepted(server: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = server
    photo = (reference_dir() / "images" / "bike.jpg").read_bytes()  # 3000×2000: slow enough
    n, held = 6, 3

    def send(_: int) -> httpx.Response:
        return httpx.post(
            f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=120
        )

    # Three requests whose bodies have only half arrived: accepted, and unanswerable until the
    # test sends the rest, so they are in flight when SIGTERM comes however fast the machine is.
    # Six whole ones beside them, queued or running or answered by then.
    halves = [begun(url, photo) for _ in range(held)]
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(send, i) for i in range(n)]
        # Every request has begun: in flight or answered, read from one scrape (so none is
        # counted twice on its way from one to the other). Only a failing run waits long.
        end = time.monotonic() + 300
        while True:
            m = scrape(url)
            if m["u2serve_requests_in_flight"] + m.get("u2serve_requests_total", 0) >= n + held:
                break
            assert time.monotonic() < end, f"requests did not arrive: {m}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # Draining: still listening (the half-sent requests keep it so), not ready, refusing work.
        while httpx.get(f"{url}/readyz", timeout=30).status_code != 503:
            assert time.monotonic() < end, "SIGTERM did not start the drain"
            time.sleep(0.02)
        late = httpx.post(
            f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
        )
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "draining"
        for conn in halves:
            conn.send(photo[len(photo) // 2 :])
        answers = [conn.getresponse() for conn in halves]
        bodies = [r.read() for r in answers]
        responses = [f.result() for f in futures]
    assert [r.status for r in answers] == [200] * held
    assert [r.status_code for r in responses] == [200] * n
    for body in [*bodies, *(r.content for r in responses)]:
        assert Image.open(io.BytesIO(body)).size == (3000, 2000)
    assert proc.wait(60) == 0


def test_missing_weights_stop_the_process(tmp_path: Path) -> None:
    proc = start(
        {
            "U2SERVE_MODEL": "u2netp",
            "U2SERVE_WEIGHTS": str(tmp_path / "none"),
            "U2SERVE_DEVICE": "cpu",
            "U2SERVE_MAX_QUEU": "5",  # a typo: warned about, not silently ignored
        },
        free_port(),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert b"python -m weights fetch u2netp" in out
    assert b"U2SERVE_MAX_QUEU is not a setting" in out


def test_invalid_setting_is_named(tmp_path: Path) -> None:
    proc = start({"U2SERVE_MAX_QUEUE": "0"}, free_port())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"U2SERVE_MAX_QUEUE" in out


def test_missing_engine_file_stops_the_process(u2netp_weights: Path, tmp_path: Path) -> None:
    """Verified weights without the CPU engine's derived file: refused at start, with the fix."""
    weights = tmp_path / "u2netp.safetensors"
    shutil.copy(u2netp_weights, weights)
    proc = start(
        {"U2SERVE_MODEL": "u2netp", "U2SERVE_WEIGHTS": str(weights), "U2SERVE_DEVICE": "cpu"},
        free_port(),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    missing = {  # the file of this CPU's float32 engine
        "mnn": f"MNN model file {weights.with_suffix('.mnn')}",
        "openvino": f"float32 model file {weights.with_suffix('.f32.xml')}",
    }[float32_cpu_engine(*cpu_features())]
    assert f"{missing} not found".encode() in out
    assert f"python -m weights prepare --model u2netp {weights}".encode() in out
