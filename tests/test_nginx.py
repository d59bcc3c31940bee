"""Real nginx (the shipped docker/nginx.conf) in front of two real replicas on loopback."""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import REPO, reference_dir, require_system_tool
from .procs import free_port, start, wait_ready

pytestmark = pytest.mark.integration


def nginx_conf(tmp: Path, listen: int, ports: tuple[int, int]) -> Path:
    """docker/nginx.conf with loopback addresses, inside a main context that writes only to tmp."""
    site = (REPO / "docker" / "nginx.conf").read_text()
    site = site.replace("u2serve-a:8000", f"127.0.0.1:{ports[0]}")
    site = site.replace("u2serve-b:8000", f"127.0.0.1:{ports[1]}")
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    temps = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {tmp / 'access.log'};\n{temps}\n{site}\n}}\n"
    )
    return conf


@pytest.fixture
def cluster(u2netp_weights: Path, tmp_path: Path) -> Iterator[dict[str, object]]:
    nginx = require_system_tool("nginx")
    ports = (free_port(), free_port())
    env = {
        "U2SERVE_MODEL": "u2netp",
        "U2SERVE_WEIGHTS": str(u2netp_weights),
        "U2SERVE_DEVICE": "cpu",
        "U2SERVE_THREADS": "1",
        "U2SERVE_MAX_BATCH_SIZE": "2",
    }
    replicas = [start(env, p) for p in ports]
    listen = free_port()
    proxy = subprocess.Popen(
        [nginx, "-c", str(nginx_conf(tmp_path, listen, ports)), "-p", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for proc, port in zip(replicas, ports, strict=True):
            wait_ready(f"http://127.0.0.1:{port}", proc)
        yield {"url": f"http://127.0.0.1:{listen}", "replicas": replicas, "ports": ports}
    finally:
        proxy.terminate()
        proxy.wait(10)
        for proc in replicas:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


def small_photo() -> bytes:
    with Image.open(reference_dir() / "images" / "horse.jpg") as im:
        buf = io.BytesIO()
        im.convert("RGB").resize((320, 247)).save(buf, "JPEG")
        return buf.getvalue()


def segment(url: str, photo: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/segment", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
    )


def test_requests_alternate(cluster: dict) -> None:
    photo = small_photo()
    upstreams = [segment(cluster["url"], photo).headers["x-upstream"] for _ in range(6)]
    assert len(set(upstreams)) == 2
    assert all(a != b for a, b in itertools.pairwise(upstreams)), upstreams


def _load_while(cluster: dict, action: signal.Signals, n: int = 24) -> list[httpx.Response]:
    """n requests at concurrency 4; after the first few answers, signal replica 0."""
    photo = small_photo()
    victim = cluster["replicas"][0]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(segment, cluster["url"], photo) for _ in range(n)]
        deadline = time.monotonic() + 60
        while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        victim.send_signal(action)
        responses = [f.result() for f in futures]
    return responses


def test_killing_a_replica_mid_load_loses_nothing(cluster: dict) -> None:
    responses = _load_while(cluster, signal.SIGKILL)
    assert [r.status_code for r in responses] == [200] * len(responses)
    survivor = f"127.0.0.1:{cluster['ports'][1]}"
    assert responses[-1].headers["x-upstream"].endswith(survivor)


def test_draining_replica_leaves_rotation_without_failures(cluster: dict) -> None:
    responses = _load_while(cluster, signal.SIGTERM)
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert cluster["replicas"][0].wait(60) == 0  # it drained and exited cleanly
    photo = small_photo()
    after = [segment(cluster["url"], photo) for _ in range(3)]
    assert [r.status_code for r in after] == [200] * 3
