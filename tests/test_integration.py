"""``python -m service`` as a real process, over a real socket."""

from __future__ import annotations

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
from .procs import free_port, serving, start, u2netp_env

pytestmark = pytest.mark.integration


@pytest.fixture
def server(u2netp_weights: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = u2netp_env(
        u2netp_weights,
        U2SERVE_MAX_BATCH_SIZE="1",
        # The slower engine, so that requests are still queued when SIGTERM arrives.
        U2SERVE_ENGINE="torch",
    )
    with serving(env) as (proc, url):
        yield proc, url


def queue_depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("u2serve_queue_depth "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_answers_everything_accepted(server: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = server
    photo = (reference_dir() / "images" / "bike.jpg").read_bytes()  # 3000×2000: slow enough
    n = 6

    def send(_: int) -> httpx.Response:
        return httpx.post(
            f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=120
        )

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(send, i) for i in range(n)]
        end = time.monotonic() + 30
        while queue_depth(url) < n - 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert queue_depth(url) >= n - 2, "requests did not queue up"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # Draining: still listening, but not ready and refusing new work.
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
        late = httpx.post(
            f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=10
        )
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "draining"
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n
    for r in responses:
        assert Image.open(io.BytesIO(r.content)).size == (3000, 2000)
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
