"""The access log: one line per /segment request with what an operator searches by, as text or
JSON; health probes stay out of it."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.core.access import JsonFormatter

from .procs import free_port, poll_ready, start, u2netp_env
from .test_api import photo, post_image, running, settings


async def test_one_line_per_request_and_none_for_probes(
    u2netp_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="u2serve.access")
    async with running(settings(u2netp_weights)) as (_, c):
        caplog.clear()
        ok = await c.post(
            "/segment",
            content=photo(),
            params={"output": "cutout"},
            headers={"content-type": "image/jpeg", "x-request-id": "find-me-1"},
        )
        bad = await post_image(c, b"not an image", ctype="image/png")
        for probe in ("/livez", "/readyz", "/metrics"):
            await c.get(probe)
    lines = [r for r in caplog.records if r.name == "u2serve.access"]
    assert len(lines) == 2  # the probes are not logged
    first, second = (r.fields for r in lines)  # type: ignore[attr-defined]
    assert first["request_id"] == "find-me-1" == ok.headers["x-request-id"]
    assert first["status"] == 200
    assert first["error"] is None
    assert first["output"] == "cutout"
    assert (first["width"], first["height"]) == (770, 595)
    assert first["bytes_in"] == len(photo())
    assert first["bytes_out"] == len(ok.content)
    # The stage times are those of Server-Timing.
    timing = {
        part.split(";")[0]: float(part.split("dur=")[1].split(";")[0])
        for part in ok.headers["server-timing"].split(", ")
    }
    assert {f"{k}_ms": v for k, v in timing.items()} == {
        k: v for k, v in first.items() if k.endswith("_ms")
    }
    assert first["batch_size"] == 1
    assert second["request_id"] == bad.headers["x-request-id"]
    assert (second["status"], second["error"]) == (415, "unsupported_image")
    assert "request_id=find-me-1 " in lines[0].getMessage()
    assert "status=415 error=unsupported_image" in lines[1].getMessage()


def test_server_timing_is_written_from_the_stages_as_before() -> None:
    """The stages are values; the header's text is the one the stages used to format (name,
    ``dur`` in milliseconds to 0.1, a quoted ``desc``), and the access line's ``<stage>_ms`` is
    the figure the header shows."""
    from service.core.pipeline import Stage
    from service.http.routes import _server_timing

    stages = [
        Stage("upload", 0.00123),
        Stage("cache", 0.0004, "miss"),
        Stage("queue", 0.01234),
        Stage("infer", 0.05678, "batch of 2, int8"),
        Stage("alpha_cache", 0.00005, "hit"),
        Stage("total", 0.1),
    ]
    header = _server_timing(stages)
    assert header == (
        'upload;dur=1.2, cache;dur=0.4;desc="miss", queue;dur=12.3, '
        'infer;dur=56.8;desc="batch of 2, int8", alpha_cache;dur=0.1;desc="hit", total;dur=100.0'
    )
    shown = [float(dur) for dur in re.findall(r"dur=([0-9.]+)", header)]
    assert shown == [round(stage.seconds * 1000, 1) for stage in stages]


def test_json_lines() -> None:
    fields = {"request_id": "r1", "status": 200, "error": None, "total_ms": 12.5}
    access = logging.LogRecord("u2serve.access", logging.INFO, "", 0, "x", None, None)
    access.fields = fields
    other = logging.LogRecord("u2serve", logging.WARNING, "", 0, "draining %d", (3,), None)
    fmt = JsonFormatter()
    a, o = json.loads(fmt.format(access)), json.loads(fmt.format(other))
    assert {k: a[k] for k in fields} == fields
    assert (a["level"], a["logger"]) == ("info", "u2serve.access")
    assert a["time"].endswith("Z")
    assert o["message"] == "draining 3"
    assert o["level"] == "warning"


@pytest.mark.integration
def test_the_service_logs_one_line_per_request(u2netp_weights: Path) -> None:
    """At the default level a served request adds its access line and nothing else: no
    library's per-call chatter (libvips reports each encode's thread pool at INFO)."""
    port = free_port()
    proc = start(u2netp_env(u2netp_weights), port)
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(line.decode() for line in iter(proc.stdout.readline, b"")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        poll_ready(url, lambda: None if proc.poll() is None else f"exited: {lines}")
        ids = ["log-one", "log-two", "log-three"]
        for rid in ids:
            r = httpx.post(
                f"{url}/segment",
                content=photo(),
                params={"output": "cutout"},  # encoded by libvips
                headers={"content-type": "image/jpeg", "x-request-id": rid},
                timeout=120,
            )
            assert r.status_code == 200
        end = time.monotonic() + 120  # the reader thread may lag behind the pipe
        while not any(ids[-1] in line for line in lines):
            assert time.monotonic() < end, lines
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(60)
        reader.join(10)
        proc.stdout.close()  # type: ignore[union-attr]
    first = next(i for i, line in enumerate(lines) if ids[0] in line)
    during = lines[first : first + len(ids)]
    assert [rid in line for rid, line in zip(ids, during, strict=True)] == [True] * len(ids), lines[
        first:
    ]
    assert all(" INFO u2serve.access: " in line for line in during), during
    assert not any("pyvips" in line for line in lines), lines
