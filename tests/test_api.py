"""The real app in-process (lifespan run, real U²-NetP weights), driven over ASGI."""

from __future__ import annotations

import asyncio
import gc
import io
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from model.engines import cpu_features, float32_cpu_engine
from model.segmenter import Segmenter
from model.torch_stages import to_mask, to_probability
from service.http.app import App, Runtime, create_app
from service.settings import Settings

from .conftest import load_rgb, reference_dir

HORSE = "horse.jpg"  # 770×595
FLOAT32_ENGINE = float32_cpu_engine(*cpu_features())  # what `auto` runs here


async def wait_ready(rt: Runtime, limit_s: float = 300) -> None:
    for _ in range(int(limit_s / 0.05)):
        if rt.is_ready:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the app did not become ready")


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await wait_ready(app.state.runtime)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", timeout=60
        ) as client:
            yield app, client


class Gate:
    """Holds every batch of the models it is put on until it is opened, counting the images it
    holds: a test that fills a queue or lets deadlines pass does it while the worker is known
    to be busy, rather than hoping the machine is slow enough."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *segmenters: Segmenter) -> None:
        self.opened = threading.Event()
        self.held = 0
        for seg in segmenters:
            monkeypatch.setattr(seg, "levels_of", self._gated(seg.levels_of))

    def _gated(self, run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def levels_of(inputs: Any) -> Any:
            self.held += len(inputs)
            self.opened.wait()
            return run(inputs)

        return levels_of


async def until(condition: Callable[[], bool], limit_s: float = 300) -> None:
    """Wait for ``condition``; only a failing test waits ``limit_s``."""
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("the condition was not reached")


def settings(weights: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "model": "u2netp",
        "weights": weights,
        "device": "cpu",
        "max_batch_wait_ms": 20,
    }
    return Settings(**(base | kw))


@pytest.fixture
async def client(u2netp_weights: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(settings(u2netp_weights)) as (_, c):
        yield c


def photo(name: str = HORSE) -> bytes:
    return (reference_dir() / "images" / name).read_bytes()


def png_bytes(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def opened(r: httpx.Response) -> Image.Image:
    im = Image.open(io.BytesIO(r.content))
    im.load()
    return im


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return sample.value
    return 0.0


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def post_image(
    c: httpx.AsyncClient, data: bytes, ctype: str = "image/jpeg", **params: Any
) -> httpx.Response:
    return await c.post("/segment", content=data, headers={"content-type": ctype}, params=params)


# -- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["mask", "probability", "cutout"])
@pytest.mark.parametrize("fmt", ["png", "webp"])
async def test_each_output_and_format(client: httpx.AsyncClient, output: str, fmt: str) -> None:
    r = await client.post(
        "/segment",
        files={"image": ("h.jpg", photo(), "image/jpeg")},
        data={"output": output, "format": fmt},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == f"image/{fmt}"
    im = opened(r)
    assert im.format == fmt.upper()
    assert im.size == (770, 595)
    if output == "cutout":
        assert im.mode == "RGBA"
    elif fmt == "png":
        assert im.mode == "L"
    else:  # WebP has no one-channel mode: grey comes back as three equal channels
        arr = np.asarray(im)
        assert (arr == arr[..., :1]).all()
        im = im.convert("L")
    if output == "mask":
        assert set(np.unique(np.asarray(im))) <= {0, 255}


async def test_maps_are_the_pipelines_maps(client: httpx.AsyncClient, u2netp_weights: Path) -> None:
    """What comes over HTTP is exactly the tensor pipeline's output, encoded losslessly."""
    (m,) = Segmenter("u2netp", u2netp_weights, device="cpu").predict(
        [load_rgb(reference_dir() / "images" / HORSE)]
    )
    p = torch.from_numpy(m)
    prob = await post_image(client, photo(), output="probability")
    mask = await post_image(client, photo(), threshold=0.3)
    cut = await post_image(client, photo(), output="cutout", alpha="mask", threshold=0.3)
    np.testing.assert_array_equal(np.asarray(opened(prob)), to_probability(p).numpy())
    np.testing.assert_array_equal(np.asarray(opened(mask)), to_mask(p, 0.3).numpy())
    rgba = np.asarray(opened(cut))
    alpha = to_mask(p, 0.3).numpy()
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    original = load_rgb(reference_dir() / "images" / HORSE).numpy()
    np.testing.assert_array_equal(rgba[alpha > 0, :3], original[alpha > 0])
    assert (rgba[alpha == 0] == 0).all()  # invisible colour is zeroed


async def test_threshold_extremes(client: httpx.AsyncClient) -> None:
    everything = np.asarray(opened(await post_image(client, photo(), threshold=0)))
    nothing = np.asarray(opened(await post_image(client, photo(), threshold=1)))
    assert (everything == 255).all()
    assert (nothing == 255).mean() < 0.01


async def test_headers_request_id_and_server_timing(client: httpx.AsyncClient) -> None:
    r = await post_image(client, photo(), ctype="image/jpeg")
    assert r.status_code == 200
    assert len(r.headers["x-request-id"]) == 32
    stages = [part.split(";")[0] for part in r.headers["server-timing"].split(", ")]
    assert stages == ["upload", "decode", "cache", "queue", "infer", "encode", "total"]
    assert "cache;dur=" in r.headers["server-timing"]
    assert 'desc="miss"' in r.headers["server-timing"]
    r = await client.post(
        "/segment",
        content=photo(),
        headers={"content-type": "image/jpeg", "x-request-id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"


async def test_octet_stream_body_is_sniffed(client: httpx.AsyncClient) -> None:
    r = await post_image(client, photo(), ctype="application/octet-stream")
    assert r.status_code == 200


# -- bad input -----------------------------------------------------------------------------------


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real 1-bit PNG of width×height black pixels: ~50 KB on the wire, 400 MP decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_INPUTS: dict[str, tuple[Callable[[], tuple[bytes, str]], int, str]] = {
    "empty body": (lambda: (b"", "image/png"), 400, "bad_request"),
    "text as image": (lambda: (b"hello, world\n" * 10, "image/png"), 415, "unsupported_image"),
    "text content type": (lambda: (b"hello", "text/plain"), 415, "unsupported_image"),
    "truncated jpeg": (lambda: (photo()[:20_000], "image/jpeg"), 415, "unsupported_image"),
    "png bomb 20000x20000": (lambda: (png_bomb(), "image/png"), 413, "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_input(client: httpx.AsyncClient, case: str) -> None:
    make, status, code = BAD_INPUTS[case]
    data, ctype = make()
    assert_error(await post_image(client, data, ctype=ctype), status, code)


async def test_text_file_in_multipart(client: httpx.AsyncClient) -> None:
    r = await client.post("/segment", files={"image": ("a.txt", b"not an image", "text/plain")})
    assert_error(r, 415, "unsupported_image")


async def test_multipart_without_image_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/segment", files={"picture": ("h.jpg", photo(), "image/jpeg")})
    assert r.status_code in (400, 422)
    assert "image" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"output": "outline"}, "output"),
        ({"threshold": "2"}, "threshold"),
        ({"threshold": "half"}, "threshold"),
        ({"format": "gif"}, "format"),
        ({"treshold": "0.3"}, "unknown parameter"),
    ],
)
async def test_wrong_parameter(
    client: httpx.AsyncClient, params: dict[str, str], needle: str
) -> None:
    r = await post_image(client, photo(), **params)
    assert_error(r, 422, "invalid_parameter")
    assert needle in r.json()["error"]["message"]
    r = await client.post(
        "/segment", files={"image": ("h.jpg", photo(), "image/jpeg")}, data=params
    )
    assert_error(r, 422, "invalid_parameter")


async def test_too_many_bytes(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, max_upload_bytes=50_000)) as (_, c):
        assert_error(await post_image(c, photo("bike.jpg")), 413, "image_too_large")
        r = await c.post("/segment", files={"image": ("b.jpg", photo("bike.jpg"), "image/jpeg")})
        assert_error(r, 413, "image_too_large")


async def test_too_many_pixels(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, max_pixels=100_000)) as (_, c):
        r = await post_image(c, photo())
        assert_error(r, 413, "image_too_large")
        assert "770×595" in r.json()["error"]["message"]


async def test_sixteen_bit_png_is_scaled_not_clipped(client: httpx.AsyncClient) -> None:
    grey = Image.open(io.BytesIO(photo())).convert("L")
    wide = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert wide.mode.startswith("I")
    r16 = await post_image(client, png_bytes(wide), ctype="image/png", output="probability")
    r8 = await post_image(client, png_bytes(grey), ctype="image/png", output="probability")
    assert r16.status_code == r8.status_code == 200
    np.testing.assert_array_equal(np.asarray(opened(r16)), np.asarray(opened(r8)))


async def test_cmyk_jpeg(client: httpx.AsyncClient) -> None:
    rgb = Image.open(io.BytesIO(photo()))
    cmyk = jpeg_bytes(rgb.convert("CMYK"))
    r = await post_image(client, cmyk)
    assert r.status_code == 200, r.text
    ref = await post_image(client, photo())
    a, b = np.asarray(opened(r)) > 0, np.asarray(opened(ref)) > 0
    assert (a & b).sum() / (a | b).sum() > 0.95


async def test_palette_png_with_transparency(client: httpx.AsyncClient) -> None:
    im = Image.open(io.BytesIO(photo())).convert("P", palette=Image.Palette.ADAPTIVE, colors=63)
    arr = np.array(im)
    arr[:, :100] = 63  # the left strip is transparent
    pal = Image.fromarray(arr, "P")
    pal.putpalette([*(im.getpalette() or [])[: 63 * 3], 0, 0, 0])  # 63: unused by the photo
    data = png_bytes(pal, transparency=63)
    r = await post_image(
        client, data, ctype="image/png", output="cutout", alpha="mask", threshold=0
    )
    assert r.status_code == 200, r.text
    rgba = np.asarray(opened(r))
    assert rgba.shape == (595, 770, 4)
    assert (rgba[:, :100, 3] == 0).all()
    assert (rgba[:, 100:, 3] == 255).all()


async def test_exif_rotated_jpeg_is_answered_upright(client: httpx.AsyncClient) -> None:
    upright = Image.open(io.BytesIO(photo()))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    r = await post_image(client, jpeg_bytes(stored, exif=exif.tobytes()))
    assert r.status_code == 200, r.text
    assert opened(r).size == (770, 595)
    plain = await post_image(client, jpeg_bytes(upright))
    a, b = np.asarray(opened(r)) > 0, np.asarray(opened(plain)) > 0
    assert (a & b).sum() / (a | b).sum() > 0.97


# -- batching, overload, deadlines ---------------------------------------------------------------


async def test_concurrent_requests_are_batched(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(settings(u2netp_weights, max_batch_size=4, max_batch_wait_ms=200)) as (
        app,
        c,
    ):
        rt = app.state.runtime
        gate = Gate(monkeypatch, rt.segmenter)
        # Eight photos (the same one again could be answered from the map cache), queued while
        # the first batch is held.
        small = [
            jpeg_bytes(Image.open(io.BytesIO(photo())).resize((160 + i, 120))) for i in range(8)
        ]
        sent = [asyncio.ensure_future(post_image(c, p)) for p in small]
        await until(lambda: gate.held + rt.batcher.depth == 8)
        gate.opened.set()
        rs = await asyncio.gather(*sent)
        assert [r.status_code for r in rs] == [200] * 8
        text = (await c.get("/metrics")).text
    batches = metric(text, "u2serve_batch_size_count")
    images = metric(text, "u2serve_batch_size_sum")
    assert images == 8
    assert batches < 8, f"{images} images in {batches} batches"
    assert metric(text, "u2serve_requests_total", {"output": "mask", "status": "200"}) == 8


async def test_cpu_batches_default_to_one_image(u2netp_weights: Path) -> None:
    """On a CPU one image already uses every core; larger batches measured slower."""
    async with running(settings(u2netp_weights)) as (app, _):
        assert app.state.runtime.batcher.max_batch_size == 1
    async with running(settings(u2netp_weights, max_batch_size=3)) as (app, _):
        assert app.state.runtime.batcher.max_batch_size == 3


async def test_full_queue_gives_503_with_retry_after(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings(
        u2netp_weights, max_batch_size=1, max_queue=2, max_batch_wait_ms=0, codec_threads=1
    )
    async with running(s) as (app, c):
        rt = app.state.runtime
        gate = Gate(monkeypatch, rt.segmenter)
        sent = [asyncio.ensure_future(post_image(c, photo())) for _ in range(10)]
        # Every request refused, or held by the worker, or waiting in the full queue.
        await until(lambda: sum(f.done() for f in sent) + gate.held + rt.batcher.depth == 10)
        gate.opened.set()
        rs = await asyncio.gather(*sent)
        text = (await c.get("/metrics")).text
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    # The service holds two waiting beyond one image at the network and one on the codec thread
    # (service/core/admission.py); nothing was answered while the gate was shut.
    assert codes.count(200) == 4
    for r in rs:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
    assert metric(text, "u2serve_rejected_total", {"reason": "queue_full"}) == codes.count(503)


async def test_expired_deadline_gives_504_and_skips_the_model(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings(
        u2netp_weights,
        max_batch_size=1,
        request_timeout_s=0.3,
        max_batch_wait_ms=0,
        cache_map_bytes=0,  # every answer from the model, none from the map cache
    )
    async with running(s) as (app, c):
        rt = app.state.runtime
        gate = Gate(monkeypatch, rt.segmenter)
        sent = [asyncio.ensure_future(post_image(c, photo())) for _ in range(6)]
        # The worker holds at most one; the others wait past their deadline and are answered.
        await until(lambda: sum(f.done() for f in sent) + gate.held == 6)
        # The held one began before now: once this has passed, so has its deadline, and its
        # answer is not made for nobody (service/core/admission.py's PoolStage).
        await asyncio.sleep(s.request_timeout_s)
        gate.opened.set()
        rs = await asyncio.gather(*sent)
        text = (await c.get("/metrics")).text
    for r in rs:
        assert_error(r, 504, "timeout")
    # Only the one held was run through the model; the others were withdrawn from its queue.
    assert metric(text, "u2serve_batch_size_sum") == gate.held == 1


# -- health, readiness, metrics, docs, auth ------------------------------------------------------


async def test_health_and_metrics(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights)) as (app, c):
        assert (await c.get("/livez")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["model"] == "u2netp"
        assert ready.json()["precision"] == "faithful"
        await post_image(c, photo())
        text = (await c.get("/metrics")).text
        for name in (
            "u2serve_request_duration_seconds_count",
            "u2serve_queue_wait_seconds_count",
            "u2serve_inference_duration_seconds_count",
            "u2serve_batch_size_count",
        ):
            assert metric(text, name) >= 1, name
        assert metric(text, "u2serve_queue_depth") == 0
        assert (
            metric(
                text,
                "u2serve_model_info",
                {"model": "u2netp", "engine": FLOAT32_ENGINE, "device": "cpu", "dtype": "float32"},
            )
            == 1
        )
        # Health and metrics routes are not traffic.
        assert metric(text, "u2serve_requests_total", {"output": "mask", "status": "200"}) == 1

        # Draining: readiness and new work are refused.
        await app.state.runtime.drain(1.0)
        assert_error(await c.get("/readyz"), 503, "draining")
        r = await post_image(c, photo())
        assert_error(r, 503, "draining")
        assert r.headers["retry-after"] == "1"
        assert r.headers["connection"] == "close"  # so a keep-alive client moves on


async def test_fast_precision_serves_the_int8_model(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, precision="fast")) as (_, c):
        ready = (await c.get("/readyz")).json()
        assert (ready["engine"], ready["dtype"], ready["precision"]) == ("openvino", "int8", "fast")
        assert ready["arithmetic"].startswith("int8+float32 (")  # the head kept in float32
        r = await post_image(c, photo())
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"


async def test_not_ready_until_warmed_up(u2netp_weights: Path) -> None:
    app = create_app(settings(u2netp_weights))
    rt = app.state.runtime
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            if not rt.is_ready:  # warm-up runs in the background after the weights load
                assert_error(await c.get("/readyz"), 503, "not_ready")
                assert_error(await post_image(c, photo()), 503, "not_ready")
            await wait_ready(rt)
            assert (await c.get("/readyz")).status_code == 200


async def test_a_process_of_its_own_freezes_what_it_loaded_until_closed(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once warmed up, what the service's own process holds is out of the garbage collector's
    passes, and collectable again once it is closed; an embedding process keeps its collector
    as it was."""
    import service.core.service as core

    monkeypatch.setattr(core, "map_large_buffers", lambda: False)  # this process's allocator
    gc.unfreeze()
    async with running(settings(u2netp_weights)) as (_, c):
        assert gc.get_freeze_count() == 0  # embedded
        assert (await post_image(c, photo())).status_code == 200
    app = create_app(settings(u2netp_weights), owns_process=True)
    async with app.router.lifespan_context(app):
        await wait_ready(app.state.runtime)
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


async def test_bad_weights_stop_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "u2netp.safetensors"
    bad.write_bytes(b"\x00" * 100)
    app = create_app(settings(bad))
    with pytest.raises(Exception, match="python -m weights fetch u2netp"):
        async with app.router.lifespan_context(app):
            pass


async def test_require_gpu_refuses_to_start_without_one(u2netp_weights: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    app = create_app(settings(u2netp_weights, require_gpu=True))
    with pytest.raises(RuntimeError, match="REQUIRE_GPU"):
        async with app.router.lifespan_context(app):
            pass


async def test_api_key(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, api_key="s3cret")) as (_, c):
        assert_error(await post_image(c, photo()), 401, "unauthorized")
        ok = await c.post(
            "/segment",
            content=photo(),
            headers={"content-type": "image/jpeg", "authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        key = {"content-type": "image/jpeg", "x-api-key": "s3cret"}
        assert (await c.post("/segment", content=photo(), headers=key)).status_code == 200
        key["x-api-key"] = "s3cre"
        assert_error(await c.post("/segment", content=photo(), headers=key), 401, "unauthorized")
        assert (await c.get("/readyz")).status_code == 200


async def test_openapi_documents_parameters_and_errors(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/segment"]["post"]
    assert {p["name"] for p in op["parameters"]} == {
        "output",
        "threshold",
        "format",
        "crop",
        "crop_margin",
        "bg_color",
        "quality",
        "max_side",
        "refine",
        "alpha",
        "model",
        "url",
        "image_id",
    }
    assert {"200", "400", "403", "404", "413", "415", "422", "502", "503", "504"} <= set(
        op["responses"]
    )
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "application/x-www-form-urlencoded" in op["requestBody"]["content"]
    # The image's three sources, and the model, as form fields too; a form names one source.
    content = op["requestBody"]["content"]
    multipart = content["multipart/form-data"]["schema"]["properties"]
    assert {"image", "url", "image_id", "model"} <= set(multipart)
    form = content["application/x-www-form-urlencoded"]["schema"]
    assert {"url", "image_id", "model"} <= set(form["properties"])
    assert form["oneOf"] == [{"required": ["url"]}, {"required": ["image_id"]}]
    assert "X-Image-Id" in op["responses"]["200"]["headers"]
    model = next(p for p in op["parameters"] if p["name"] == "model")
    assert model["schema"]["enum"] == ["u2netp"]
    assert (await client.get("/docs")).status_code == 200


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")


async def test_image_routes_answer_the_same_past_fastapis_routing(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``App`` calls the endpoints every image goes through straight from the server. A client
    under a root path goes FastAPI's whole way to the same endpoints: the answers, good and
    bad, are the same but for the request's own id and timings."""
    whole_way = 0
    fastapi_call = FastAPI.__call__

    async def counted(self: FastAPI, scope: Any, receive: Any, send: Any) -> None:
        nonlocal whole_way
        whole_way += scope["type"] == "http"
        await fastapi_call(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counted)
    jpeg, upload = {"content-type": "image/jpeg"}, ("h.jpg", photo(), "image/jpeg")
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/segment?output=mask", {"content": photo(), "headers": jpeg}),
        ("POST", "/segment?output=cutout&format=webp&crop=true", {"files": {"image": upload}}),
        ("POST", "/segment", {"content": b"not an image", "headers": jpeg}),
        ("POST", "/segment?threshold=2", {"content": photo(), "headers": jpeg}),
        ("POST", "/api/remove", {"files": {"file": upload}, "data": {"om": "true"}}),
        ("GET", "/api/remove", {}),
        ("POST", "/v1.0/removebg", {"files": {"image_file": upload}}),
    ]
    async with running(settings(u2netp_weights)) as (app, direct):
        assert set(cast(App, app).direct) == {
            ("POST", "/segment"),
            ("POST", "/v1.0/removebg"),
            ("GET", "/api/remove"),
            ("POST", "/api/remove"),
        }
        mounted = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, root_path="/under"),
            base_url="http://test/under",
            timeout=60,
        )
        async with mounted:
            for method, url, kw in calls:
                a = await direct.request(method, url, **kw)
                assert whole_way == 0
                b = await mounted.request(method, url, **kw)
                assert whole_way == 1
                whole_way = 0
                assert (a.status_code, a.content) == (b.status_code, b.content), url
                own = {"x-request-id", "server-timing", "x-image-id"}
                assert {k: v for k, v in a.headers.items() if k not in own} == {
                    k: v for k, v in b.headers.items() if k not in own
                }, url
        # Methods and paths of their own still go FastAPI's way: its 405, and its 404.
        assert_error(await direct.get("/segment"), 405, "method_not_allowed")
        assert (await direct.post("/segment/")).status_code == 307  # its redirect of a slash


async def test_cors_preflight_for_configured_origins(u2netp_weights: Path) -> None:
    s = settings(u2netp_weights, cors_origins="https://app.example, https://b.example")
    async with running(s) as (_, c):
        ok = await c.options(
            "/segment",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = await c.options(
            "/segment",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        r = await c.post(
            "/segment",
            content=photo(),
            headers={"content-type": "image/jpeg", "origin": "https://b.example"},
        )
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


async def test_a_parameter_given_twice_is_refused(client: httpx.AsyncClient) -> None:
    """Found by schemathesis: one of the values was silently chosen."""
    r = await client.post(
        "/segment?threshold=0.2&threshold=oops",
        content=photo(),
        headers={"content-type": "image/jpeg"},
    )
    assert_error(r, 422, "invalid_parameter")
    assert "more than once" in r.json()["error"]["message"]
    # A bad query value is refused even when a form field of the same name is given.
    r = await client.post(
        "/segment?threshold=AAA",
        files={"image": ("h.jpg", photo(), "image/jpeg")},
        data={"threshold": "0.5"},
    )
    assert_error(r, 422, "invalid_parameter")


async def test_multipart_without_boundary_is_400(client: httpx.AsyncClient) -> None:
    """Found by schemathesis: a 500."""
    r = await client.post("/segment", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "bad_request")


async def test_torch_work_runs_on_one_thread(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, warm-up and batches share one thread: each further thread that starts OpenMP
    work gets a team of its own, and the batch thread's operations ran twice as slow."""
    import service.core.service

    threads: dict[str, set[int]] = {"load": set(), "warmup": set(), "batch": set()}
    load, run = service.core.service.load_segmenter, service.core.service.run_batch

    def loading(s: Settings, model: str | None = None) -> Segmenter:
        threads["load"].add(threading.get_ident())
        seg = load(s, model)
        warm = seg.warmup

        def warmup(sizes: Any) -> None:
            threads["warmup"].add(threading.get_ident())
            warm(sizes)

        monkeypatch.setattr(seg, "warmup", warmup)
        return seg

    def batch(seg: Segmenter, jobs: Any, **kwargs: Any) -> Any:
        threads["batch"].add(threading.get_ident())
        return run(seg, jobs, **kwargs)

    monkeypatch.setattr(service.core.service, "load_segmenter", loading)
    monkeypatch.setattr(service.core.service, "run_batch", batch)
    async with running(settings(u2netp_weights, engine="torch")) as (_, c):
        for _ in range(3):
            assert (await post_image(c, photo())).status_code == 200
    assert len(threads["load"] | threads["warmup"] | threads["batch"]) == 1, threads
    assert all(threads.values())


@pytest.mark.parametrize("engine", ["mnn", "openvino"])
async def test_an_engine_ready_at_load_is_not_warmed_up(
    u2netp_weights: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MNN's session and OpenVINO's compiled model are prepared at load: the service is ready
    without running them first (the codecs' passes are still loaded), and answers."""

    def refused(self: Segmenter, sizes: Any = (1,)) -> None:
        raise AssertionError(f"{self.engine.name} was warmed up")

    monkeypatch.setattr(Segmenter, "warmup", refused)
    async with running(settings(u2netp_weights, engine=engine)) as (_, c):
        assert (await c.get("/readyz")).status_code == 200
        assert (await post_image(c, photo())).status_code == 200
