"""Two models in one process: each request answered by the model it names, with that model's own
maps (those of a Segmenter of that model alone), and each model batched on its own."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
from fastapi import FastAPI
from PIL import Image

from model.segmenter import Segmenter
from model.torch_stages import to_probability
from model.weights import default_weights_dir
from service.settings import Settings

from .conftest import load_rgb, reference_dir, weights_file
from .test_api import (
    Gate,
    assert_error,
    jpeg_bytes,
    metric,
    opened,
    photo,
    post_image,
    running,
    until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

HORSE = "horse.jpg"
MODELS = ("u2netp", "u2net")  # the first is the default


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def two(u2netp_weights: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    weights_file("u2net")
    s = Settings(
        models=",".join(MODELS),
        weights_dir=default_weights_dir(),
        device="cpu",
        max_batch_size=4,
        max_batch_wait_ms=300,
    )
    async with running(s) as (app, client):
        yield app, client


@pytest.mark.parametrize("name", MODELS)
async def test_each_model_answers_with_its_own_maps(
    two: tuple[FastAPI, httpx.AsyncClient], name: str
) -> None:
    _, client = two
    (p,) = Segmenter(name, weights_file(name), device="cpu").predict(
        [load_rgb(reference_dir() / "images" / HORSE)]
    )
    expected = to_probability(torch.from_numpy(p)).numpy()
    r = await post_image(client, photo(), output="probability", model=name)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(opened(r)), expected)
    form = await client.post(
        "/segment",
        files={"image": ("h.jpg", photo(), "image/jpeg")},
        data={"output": "probability", "model": name},
    )
    np.testing.assert_array_equal(np.asarray(opened(form)), expected)


async def test_the_default_is_the_first_and_the_models_differ(
    two: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = two
    default = await post_image(client, photo(), output="probability")
    small = await post_image(client, photo(), output="probability", model="u2netp")
    large = await post_image(client, photo(), output="probability", model="u2net")
    assert default.content == small.content
    assert np.abs(np.asarray(opened(small), float) - np.asarray(opened(large), float)).mean() > 1


async def test_an_unknown_model_lists_the_loaded_ones(
    two: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = two
    r = await post_image(client, photo(), model="isnet")
    assert_error(r, 422, "invalid_parameter")
    assert "u2netp, u2net" in r.json()["error"]["message"]


async def test_readiness_lists_every_model(two: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = two
    ready = (await client.get("/readyz")).json()
    assert ready["model"] == "u2netp"
    assert [m["model"] for m in ready["models"]] == list(MODELS)
    spec = (await client.get("/openapi.json")).json()
    (param,) = (p for p in spec["paths"]["/segment"]["post"]["parameters"] if p["name"] == "model")
    assert param["schema"]["enum"] == list(MODELS)
    assert param["schema"]["default"] == "u2netp"


async def test_each_model_is_batched_on_its_own(
    two: tuple[FastAPI, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = two
    models = app.state.runtime.models
    gate = Gate(monkeypatch, *(m.segmenter for m in models.values()))
    before = (await client.get("/metrics")).text
    # Eight different photos: the same one again could be answered from the map cache, without
    # a batch, once an earlier request's batch had run.
    small = [jpeg_bytes(Image.open(io.BytesIO(photo())).resize((160 + i, 120))) for i in range(8)]
    names = [MODELS[i % 2] for i in range(8)]  # interleaved, all at once
    sent = [
        asyncio.ensure_future(post_image(client, small[i], model=n)) for i, n in enumerate(names)
    ]
    registry = app.state.runtime.metrics.registry

    def arrived() -> float:
        """Requests waiting in a queue, or taken from it by their model's worker."""
        taken = sum(
            registry.get_sample_value("u2serve_queue_wait_seconds_count", {"model": n}) or 0
            for n in models
        )
        return taken + sum(m.batcher.depth for m in models.values())

    # Queued while the first batch (of one model or the other) is held: the rest wait together.
    taken_before = arrived()
    await until(lambda: arrived() - taken_before == 8)
    gate.opened.set()
    rs = await asyncio.gather(*sent)
    assert [r.status_code for r in rs] == [200] * 8
    after = (await client.get("/metrics")).text
    for name in MODELS:
        images, batches = (
            metric(after, f"u2serve_batch_size_{k}", {"model": name})
            - metric(before, f"u2serve_batch_size_{k}", {"model": name})
            for k in ("sum", "count")
        )
        # Every one of this model's images went through its own batches (a mixed batch would
        # count another model's image here), and they were batched together.
        assert images == 4, (name, images)
        assert batches < 4, f"{name}: {images} images in {batches} batches"
        labels = {"model": name, "output": "mask", "status": "200"}
        served = metric(after, "u2serve_requests_total", labels)
        assert served - metric(before, "u2serve_requests_total", labels) == 4
    sizes = [int(r.headers["server-timing"].split('"batch of ')[1].split('"')[0]) for r in rs]
    assert max(sizes) <= 4
    assert app.state.runtime.models.keys() == set(MODELS)
