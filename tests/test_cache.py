"""The map cache and image ids, in-process: a hit gives the bytes a miss gives, for every output,
format and option; what decides a map is in its key; the bounds; unknown, malformed and foreign
ids. (Redis shared by two real processes: tests/test_redis.py.)"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from model.segmenter import Segmenter
from model.weights import default_weights_dir, recorded_digest
from service.core.cache import Caches, map_key, owner_of, valid_image_id
from service.core.cache.memory import MemoryMapCache, MemoryUploadStore
from service.metrics import Metrics
from service.settings import Settings

from .conftest import weights_file
from .test_api import assert_error, metric, photo, running, settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

HORSE = "horse.jpg"  # 770×595
MAP_BYTES = 320 * 320  # one network map


def alpha_png() -> bytes:
    """The horse with a transparent band: cut-outs keep the photo's own transparency."""
    with Image.open(io.BytesIO(photo(HORSE))) as im:
        rgba = np.dstack([np.asarray(im.convert("RGB")), np.full((595, 770), 255, np.uint8)])
    rgba[:, :200, 3] = np.linspace(0, 255, 200, dtype=np.uint8)[None, :]
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def apps(u2netp_weights: Path) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """``cold`` keeps no maps (every answer a miss); ``warm`` is the default."""
    async with (
        running(settings(u2netp_weights, cache_map_bytes=0)) as (_, cold),
        running(settings(u2netp_weights)) as (_, warm),
    ):
        yield {"cold": cold, "warm": warm}


def stage(r: httpx.Response, name: str) -> str | None:
    """The ``desc`` of a Server-Timing entry, or "" if it has none, None if it is absent."""
    for part in r.headers["server-timing"].split(", "):
        fields = part.split(";")
        if fields[0] == name:
            return next((f[6:-1] for f in fields if f.startswith("desc=")), "")
    return None


CASES: list[dict[str, str]] = [
    {},
    {"format": "webp"},
    {"output": "probability"},
    {"output": "probability", "format": "webp", "threshold": "0.8"},
    {"output": "cutout"},
    {"output": "cutout", "format": "webp"},
    {"output": "cutout", "bg_color": "ffffff", "format": "jpeg", "quality": "80"},
    {"output": "cutout", "bg_color": "33669980"},
    {"output": "box"},
    {"output": "box", "crop": "true", "crop_margin": "10%"},
    {"threshold": "0.2", "crop": "true", "crop_margin": "15"},
    {"max_side": "200"},
    {"output": "cutout", "crop": "true", "max_side": "300"},
    {"refine": "true"},
    {"refine": "true", "output": "probability"},
    {"refine": "true", "output": "cutout", "threshold": "0.3", "format": "webp"},
    {"refine": "true", "output": "cutout", "crop": "true", "crop_margin": "5%", "max_side": "256"},
]


@pytest.mark.parametrize(("name", "ctype"), [(HORSE, "image/jpeg"), ("alpha.png", "image/png")])
async def test_a_hit_is_the_bytes_of_a_miss(
    apps: dict[str, httpx.AsyncClient], name: str, ctype: str
) -> None:
    data = photo(name) if name != "alpha.png" else alpha_png()
    cold, warm = apps["cold"], apps["warm"]
    first = await warm.post("/segment", content=data, headers={"content-type": ctype})
    assert first.status_code == 200, first.text
    image_id = first.headers["x-image-id"]
    for case in CASES:
        miss = await cold.post(
            "/segment", content=data, headers={"content-type": ctype}, params=case
        )
        assert miss.status_code == 200, (case, miss.text)
        assert stage(miss, "cache") == "miss"
        # By id (empty body), and by uploading the same bytes again: both hits.
        by_id = await warm.post("/segment", params=case | {"image_id": image_id})
        again = await warm.post(
            "/segment", content=data, headers={"content-type": ctype}, params=case
        )
        for hit in (by_id, again):
            assert hit.status_code == 200, (case, hit.text)
            assert stage(hit, "cache") == "hit", case
            assert stage(hit, "infer") is None  # no network pass
            assert hit.content == miss.content, case
            assert hit.headers["content-type"] == miss.headers["content-type"]
            for header in miss.headers:
                if header.startswith("x-foreground-"):
                    assert hit.headers[header] == miss.headers[header], (case, header)


async def test_ids_in_every_form_and_what_they_reveal(apps: dict[str, httpx.AsyncClient]) -> None:
    warm = apps["warm"]
    data = photo()
    answers = [
        await warm.post("/segment", content=data, headers={"content-type": "image/jpeg"}),
        await warm.post("/segment", files={"image": ("h.jpg", data, "image/jpeg")}),
        await warm.post("/segment", content=data, params={"output": "box"}),
    ]
    ids = [r.headers["x-image-id"] for r in answers]
    assert all(valid_image_id(i) for i in ids)
    # Random: the same photo gets a new id each time, and no id is made from its digest.
    assert len(set(ids)) == 3
    sha = hashlib.sha256(data).hexdigest()
    assert not any(i in sha or i.lower()[:8] in sha for i in ids)

    box = await warm.post("/segment", params={"output": "box", "image_id": ids[0]})
    expected = await warm.post("/segment", content=data, params={"output": "box"})
    assert box.json() == expected.json()
    assert box.headers["x-image-id"] == ids[0]
    # The id and the parameters as form fields, form-encoded or in a multipart body.
    form = await warm.post("/segment", data={"image_id": ids[1], "output": "box"})
    assert form.status_code == 200, form.text
    assert form.json() == expected.json()
    multipart = await warm.post(
        "/segment", files={"image_id": (None, ids[2]), "output": (None, "box")}
    )
    assert multipart.status_code == 200, multipart.text
    assert multipart.json() == expected.json()


async def test_unknown_malformed_and_doubled_ids(apps: dict[str, httpx.AsyncClient]) -> None:
    warm = apps["warm"]
    before = (await warm.get("/metrics")).text
    unknown = "A" * 22
    r = await warm.post("/segment", params={"image_id": unknown})
    assert_error(r, 404, "image_not_found")
    assert "upload the image again" in r.json()["error"]["message"]
    r = await warm.post("/segment", data={"image_id": unknown, "output": "cutout"})
    assert_error(r, 404, "image_not_found")
    after = (await warm.get("/metrics")).text
    name = "u2serve_image_id_requests_total"
    assert (
        metric(after, name, {"result": "not_found"}) - metric(before, name, {"result": "not_found"})
        == 2
    )
    for bad in ("short", "A" * 23, "../../etc/passwd00000", "A" * 21 + "="):
        r = await warm.post("/segment", params={"image_id": bad})
        assert_error(r, 422, "invalid_parameter")
        assert "image_id" in r.json()["error"]["message"]
    given = (await warm.post("/segment", content=photo())).headers["x-image-id"]
    r = await warm.post("/segment", content=photo(), params={"image_id": given})
    assert_error(r, 422, "invalid_parameter")
    r = await warm.post(
        "/segment", data={"image_id": given}, files={"image": ("h.jpg", photo(), "image/jpeg")}
    )
    assert_error(r, 422, "invalid_parameter")


async def test_an_id_works_only_with_the_key_that_uploaded_it() -> None:
    store = MemoryUploadStore(1 << 20, 60, Metrics())
    assert await store.put("i" * 22, owner_of("key-a"), b"photo")
    assert await store.get("i" * 22, owner_of("key-a")) == b"photo"
    assert await store.get("i" * 22, owner_of("key-b")) is None
    assert await store.get("i" * 22, owner_of(None)) is None
    assert owner_of("key-a") != owner_of("key-b")
    assert "key-a" not in owner_of("key-a")


async def test_with_keys_on_an_id_needs_the_key(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, api_key="secret")) as (_, c):
        auth = {"authorization": "Bearer secret"}
        r = await c.post("/segment", content=photo(), headers=auth)
        image_id = r.headers["x-image-id"]
        r = await c.post("/segment", params={"image_id": image_id})
        assert_error(r, 401, "unauthorized")
        r = await c.post("/segment", params={"image_id": image_id}, headers=auth)
        assert r.status_code == 200, r.text


async def test_maps_are_evicted_by_bytes(u2netp_weights: Path) -> None:
    # Room for one map: each new photo pushes out the one before.
    async with running(settings(u2netp_weights, cache_map_bytes=MAP_BYTES * 3 // 2)) as (_, c):
        seen = []
        for name in (HORSE, HORSE, "boat.jpg", HORSE):
            r = await c.post("/segment", content=photo(name))
            assert r.status_code == 200, r.text
            seen.append(stage(r, "cache"))
        assert seen == ["miss", "hit", "miss", "miss"]
        text = (await c.get("/metrics")).text
        assert metric(text, "u2serve_map_cache_hits_total") == 1
        assert metric(text, "u2serve_map_cache_misses_total") == 3
        assert metric(text, "u2serve_map_cache_evictions_total") == 2
        assert metric(text, "u2serve_map_cache_bytes") == MAP_BYTES


async def test_the_least_recently_used_map_goes_first() -> None:
    cache = MemoryMapCache(3 * 10)
    for key in "abc":
        cache.keep(key, bytes(10))
    assert cache.lookup("a") is not None  # a is now the most recently used
    cache.keep("d", bytes(10))
    assert cache.lookup("b") is None
    assert all(cache.lookup(k) is not None for k in "acd")
    assert cache.size_bytes == 30
    cache.keep("big", bytes(31))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 3
    assert MemoryMapCache(0).lookup("a") is None


async def test_uploads_are_bounded_by_bytes_and_time() -> None:
    now = [0.0]
    metrics = Metrics()
    store = MemoryUploadStore(10, 60, metrics, clock=lambda: now[0])
    assert await store.put("a" * 22, "", b"123456")
    assert await store.put("b" * 22, "", b"123456")  # a goes: 12 bytes would not fit
    assert await store.get("a" * 22, "") is None
    assert store.size_bytes == 6
    assert not await store.put("c" * 22, "", b"x" * 11)  # larger than the whole store
    now[0] = 50
    assert await store.get("b" * 22, "") == b"123456"  # used: kept 60 s from now
    now[0] = 100
    assert await store.get("b" * 22, "") == b"123456"
    now[0] = 161
    assert await store.get("b" * 22, "") is None
    assert store.size_bytes == 0
    assert metrics.registry.get_sample_value("u2serve_upload_cache_evictions_total") == 1


async def test_a_different_model_or_engine_misses(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three services with one shared cache: a map made by one model and engine is never
    answered for another; the same one answers from it."""
    import service.core.service

    metrics = Metrics()
    shared = Caches(
        MemoryMapCache(1 << 24, metrics), MemoryUploadStore(1 << 24, 60, metrics), _noop
    )
    monkeypatch.setattr(service.core.service, "open_caches", lambda s, m: shared)
    u2net = weights_file("u2net")
    async with (
        running(settings(u2netp_weights, engine="mnn")) as (_, mnn),
        running(settings(u2netp_weights, engine="torch")) as (_, torch_),
        running(settings(u2net, model="u2net", engine="mnn")) as (_, big),
        running(settings(u2netp_weights, engine="mnn")) as (_, mnn2),
    ):
        first = await mnn.post("/segment", content=photo())
        assert stage(first, "cache") == "miss"
        for other in (torch_, big):
            r = await other.post("/segment", content=photo())
            assert stage(r, "cache") == "miss"
        r = await mnn2.post("/segment", content=photo())
        assert stage(r, "cache") == "hit"
        assert r.content == first.content


async def _noop() -> None:
    return None


async def test_a_maps_key_names_what_decides_it(u2netp_weights: Path) -> None:
    mnn = Segmenter("u2netp", u2netp_weights, device="cpu", engine="mnn")
    torch_ = Segmenter("u2netp", u2netp_weights, device="cpu", engine="torch")
    bf16 = Segmenter("u2netp", u2netp_weights, device="cpu", engine="torch", dtype="bfloat16")
    ids = {s.identity for s in (mnn, torch_, bf16)}
    assert len(ids) == 3
    digest = recorded_digest(u2netp_weights, "u2netp")
    assert all(digest in i and i.startswith("u2netp/") for i in ids)
    assert mnn.engine.artifact_digest is not None
    assert mnn.engine.artifact_digest in mnn.identity  # the converted file is part of it
    photo_digest = hashlib.sha256(b"photo").hexdigest()
    keys = {map_key(i, photo_digest) for i in ids}
    assert len(keys) == 3
    assert all(k.endswith(photo_digest) for k in keys)


DEVICES = [
    ("cpu", "mnn", "float32"),
    ("cpu", "openvino", "float32"),
    ("cpu", "torch", "float32"),
] + (
    [("cuda", "torch", "float16"), ("cuda", "torch", "float32")]
    if __import__("torch").cuda.is_available()
    else []
)


@pytest.mark.parametrize(("device", "engine", "dtype"), DEVICES)
async def test_a_hit_is_the_map_of_a_miss_on_every_device(
    u2netp_weights: Path, device: str, engine: str, dtype: str
) -> None:
    """A batch's levels, as the cache returns them, finished as the service finishes every map
    (``finish``: numpy and OpenCV on the CPU, the device on a GPU, then the alpha stage) are the
    maps of PyTorch's second half on the model's device, the one the service ran before: for
    shrinking and enlarging, with and without refine. Runs on CUDA too whenever a GPU is
    present."""
    import torch

    from model.torch_stages import from_levels, to_mask, to_probability
    from service.core.infer import finish, run_batch
    from service.images.alpha import refined
    from service.params import SegmentParams

    seg = Segmenter("u2netp", u2netp_weights, device=device, engine=engine, dtype=dtype)
    with Image.open(io.BytesIO(photo(HORSE))) as im:
        rgb = im.convert("RGB")
    images = [np.array(rgb.resize(size)) for size in ((770, 595), (150, 90), (1, 40), (320, 320))]
    levels = run_batch(seg, [seg.prepare(image) for image in images])
    # The service's way to the levels (one stacked batch of prepared inputs) is the parity
    # tests' way.
    assert np.array_equal(np.stack(levels), seg.levels(images))
    for params in (
        SegmentParams(),
        SegmentParams(output="probability"),
        SegmentParams(threshold=0.3),
        SegmentParams(refine=True, threshold=0.3),
    ):
        for image, lv in zip(images, levels, strict=True):
            cached = np.frombuffer(lv.tobytes(), np.uint8).reshape(320, 320)
            hit = finish(seg, cached, image, params)
            assert np.array_equal(hit, finish(seg, lv, image, params)), params
            if 1 in image.shape[:2] and device == "cpu":
                # PyTorch's anti-aliased kernel gives a one-pixel-wide map the same value on
                # every row; the CPU's filter is the filter (tests/test_postprocess.py).
                continue
            soft = params.soft_map or params.refine
            with torch.inference_mode():
                m = from_levels(torch.from_numpy(np.array(lv)).to(device), image.shape[:2])
                p = (to_probability(m) if soft else to_mask(m, params.threshold)).cpu().numpy()
            if params.refine:
                p = refined(image, p, params)
            assert np.array_equal(hit, p), (params, image.shape)


async def test_each_model_of_one_service_keeps_its_own_maps(u2netp_weights: Path) -> None:
    """``U2SERVE_MODELS``: the key is the request's model, not the service's default. A photo
    sent to one model and then asked of the other by its id is a miss, then a hit; each model's
    answer from the cache is the bytes of its own miss."""
    weights_file("u2net")
    s = Settings(
        models="u2netp,u2net", weights_dir=default_weights_dir(), device="cpu", max_batch_wait_ms=20
    )
    async with running(s) as (_, c):
        small = await c.post("/segment", content=photo(), params={"output": "probability"})
        assert stage(small, "cache") == "miss"
        image_id = small.headers["x-image-id"]
        large = await c.post(
            "/segment", params={"image_id": image_id, "output": "probability", "model": "u2net"}
        )
        assert large.status_code == 200, large.text
        assert stage(large, "cache") == "miss"  # u2netp's map is no answer for u2net
        assert large.content != small.content
        for model, first in (("u2netp", small), ("u2net", large)):
            again = await c.post(
                "/segment", params={"image_id": image_id, "output": "probability", "model": model}
            )
            assert stage(again, "cache") == "hit", model
            assert again.content == first.content, model
        text = (await c.get("/metrics")).text
        for model in ("u2netp", "u2net"):
            labels = {"model": model}
            assert metric(text, "u2serve_map_cache_hits_total", labels) == 1, model
            assert metric(text, "u2serve_map_cache_misses_total", labels) == 1, model
