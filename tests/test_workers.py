"""``U2SERVE_WORKERS`` > 1: front processes on one socket in front of one inference worker, as
real processes over a real socket. The worker holds its batches behind a gate file
(tests/gated_service.py) wherever a test must act while requests wait on it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.core.budget import MemoryBudget
from service.errors import QueueFull
from service.metrics import Metrics

from .procs import distinct_photos, free_port, scrape, serving_gated, start, u2netp_env

pytestmark = pytest.mark.integration

FRONTS = 2


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    gate: Path

    def open(self) -> None:
        self.gate.touch()

    def worker(self) -> int:
        """The inference worker's pid (written by the gate when it holds a batch)."""
        return int(Path(f"{self.gate}.pid").read_text())

    def children(self) -> set[int]:
        return {
            int(c)
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        }

    def scrape(self) -> dict[str, float]:
        return scrape(self.url)


@pytest.fixture
def service(u2netp_weights: Path, tmp_path: Path) -> Iterator[Service]:
    gate = tmp_path / "gate"
    env = u2netp_env(
        u2netp_weights,
        U2SERVE_WORKERS=str(FRONTS),
        U2SERVE_MAX_BATCH_SIZE="4",
        U2SERVE_MAX_BATCH_WAIT_MS="0",
    )
    with serving_gated(env, gate, limit_s=300) as (proc, url):
        yield Service(proc, url, gate)


def post(url: str, photo: bytes, **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/segment",
        content=photo,
        params=params,
        headers={"content-type": "image/jpeg"},
        timeout=300,
    )


def until(condition: object, limit_s: float = 300) -> None:
    """Wait for ``condition()``; only a failing service makes it wait ``limit_s``."""
    end = time.monotonic() + limit_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "the condition was not reached"
        time.sleep(0.05)


def arrived(s: Service) -> float:
    """Requests in the worker's queue, or taken from it into a batch."""
    m = s.scrape()
    return m.get("u2serve_queue_depth", 0) + m.get("u2serve_queue_wait_seconds_count", 0)


def test_every_fronts_requests_share_the_workers_batches(service: Service) -> None:
    n = 8
    with ThreadPoolExecutor(n) as pool:
        sent = [pool.submit(post, service.url, p) for p in distinct_photos(n)]
        until(lambda: arrived(service) == n)  # all of them wait behind the held batch
        service.open()
        answers = [f.result() for f in sent]
    assert [r.status_code for r in answers] == [200] * n
    m = service.scrape()
    assert m["u2serve_requests_total"] == n  # added up over the fronts
    assert m["u2serve_batch_size_sum"] == n
    assert m["u2serve_batch_size_count"] < n  # batched together, whichever front took them
    assert m["u2serve_requests_in_flight"] == 0
    assert m["u2serve_ready"] == 1
    assert m["process_resident_memory_bytes"] > 0
    # An image id answered whichever front is asked: the uploads live in the worker.
    first = answers[0].headers["x-image-id"]
    again = [
        httpx.post(f"{service.url}/segment", params={"image_id": first, "output": "cutout"})
        for _ in range(2 * FRONTS)
    ]
    assert [r.status_code for r in again] == [200] * len(again)


def test_a_worker_that_dies_fails_what_waited_and_another_serves(service: Service) -> None:
    n = 4
    with ThreadPoolExecutor(n) as pool:
        sent = [pool.submit(post, service.url, p) for p in distinct_photos(n)]
        until(lambda: arrived(service) == n)
        os.kill(service.worker(), signal.SIGKILL)
        answers = [f.result() for f in sent]  # none is left hanging
    assert [r.status_code for r in answers] == [503] * n
    for r in answers:
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
    service.open()
    # A new worker; each front answers 503 until it has connected to it.
    until(lambda: post(service.url, distinct_photos(1)[0]).status_code == 200)


def test_a_front_that_dies_under_load_is_replaced(service: Service) -> None:
    n = 8
    with ThreadPoolExecutor(n) as pool:
        sent = [pool.submit(post, service.url, p) for p in distinct_photos(n)]
        until(lambda: arrived(service) == n)
        fronts = service.children() - {service.worker()}
        assert len(fronts) == FRONTS
        victim = min(fronts)
        os.kill(victim, signal.SIGKILL)
        service.open()
        # Its clients' connections are reset at once; the other front's are answered.
        for f in sent:
            with contextlib.suppress(httpx.TransportError):
                assert f.result().status_code == 200
    until(
        lambda: (
            victim not in service.children()
            and len(service.children() - {service.worker()}) == FRONTS
        )
    )
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: post(service.url, p), distinct_photos(8)))
    assert [r.status_code for r in answers] == [200] * 8


def test_sigterm_drains_every_front_then_the_worker(service: Service) -> None:
    n = 4
    with ThreadPoolExecutor(n) as pool:
        sent = [pool.submit(post, service.url, p) for p in distinct_photos(n)]
        until(lambda: arrived(service) == n)
        service.proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(f"{service.url}/readyz", timeout=30).status_code == 503)
        late = post(service.url, distinct_photos(1)[0])
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "draining"
        service.open()
        answers = [f.result() for f in sent]
    assert [r.status_code for r in answers] == [200] * n
    assert service.proc.wait(120) == 0
    # Every front mapped its large buffers (service/core/budget.py); the worker may, by its engine.
    assert service.proc.stdout is not None
    log = service.proc.stdout.read().decode()
    assert log.count("large buffers are mapped") >= FRONTS


def test_a_worker_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    """As the single process does: bad weights stop the start-up, with the loader's message."""
    bad = tmp_path / "u2netp.safetensors"
    bad.write_bytes(b"\x00" * 100)
    proc = start(u2netp_env(bad, U2SERVE_WORKERS=str(FRONTS)), free_port())
    out, _ = proc.communicate(timeout=300)  # a limit for a hung service only
    assert proc.returncode == 1, out.decode()
    log = out.decode()
    assert "the inference worker could not start; stopping" in log
    assert "WeightsError" in log


def test_the_memory_budget_is_every_processs() -> None:
    """Two budgets over the counts two fronts share: what one holds, the other may not take."""
    held = multiprocessing.Array("q", 2)
    a, b = (
        MemoryBudget(100, metrics=Metrics(), retry_after=lambda: 1, shared=held, front=front)
        for front in (0, 1)
    )
    with a.hold(70):
        with pytest.raises(QueueFull):
            b.charge(40)
        with b.hold(30):
            assert list(held) == [70, 30]
    assert list(held) == [0, 0]
    assert a.held_bytes == b.held_bytes == 0
