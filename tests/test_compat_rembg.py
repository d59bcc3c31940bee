"""rembg's server API (``/api/remove``) against a real service process: the requests rembg's
README shows for ``rembg s`` (``curl -F file=@…``, ``?url=``) and its options (``om``, ``ppm``,
``bgc``, ``a``, ``model``), each answer held to ``/segment``'s for the options it translates to;
and what cannot be honoured, refused."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import reference_dir
from .procs import file_server, serving, u2netp_env
from .test_api import Gate, running, settings, until

pytestmark = pytest.mark.integration

ALLOWED = "127.0.0.2"  # the photo server's address, which the service is told it may fetch from
PHOTO = (reference_dir() / "images" / "horse.jpg").read_bytes()  # 770×595


@pytest.fixture(scope="module")
def photos() -> Iterator[str]:
    files = {"/horse.jpg": (PHOTO, "image/jpeg"), "/page": (b"<html></html>", "text/html")}
    with file_server(ALLOWED, files) as base:
        yield base


@pytest.fixture(scope="module")
def server(u2netp_weights: Path, photos: str) -> Iterator[str]:
    with serving(u2netp_env(u2netp_weights, U2SERVE_URL_ALLOW=ALLOWED)) as (_, url):
        yield url


def image(r: httpx.Response) -> np.ndarray:
    with Image.open(io.BytesIO(r.content)) as im:
        return np.asarray(im)


def segment(server: str, **params: Any) -> httpx.Response:
    r = httpx.post(
        f"{server}/segment",
        content=PHOTO,
        params=params,
        headers={"content-type": "image/jpeg"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r


def upload(server: str, query: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    """``curl -F file=@photo.jpg [-F field=value …] http://…/api/remove[?query]``."""
    return httpx.post(
        f"{server}/api/remove",
        params=query,
        files={"file": ("photo.jpg", PHOTO, "image/jpeg")},
        data=fields,
        timeout=120,
    )


def assert_rembg_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == code
    assert r.json()["detail"]


def test_an_upload_is_the_cutout(server: str) -> None:
    r = upload(server)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    rgba = image(r)
    assert rgba.shape == (595, 770, 4)
    np.testing.assert_array_equal(rgba, image(segment(server, output="cutout", alpha="soft")))


def test_a_url_is_fetched(server: str, photos: str) -> None:
    r = httpx.get(f"{server}/api/remove", params={"url": f"{photos}/horse.jpg"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(image(r), image(segment(server, output="cutout", alpha="soft")))
    both = httpx.get(
        f"{server}/api/remove", params={"url": f"{photos}/horse.jpg", "om": "true"}, timeout=120
    )
    np.testing.assert_array_equal(image(both), image(segment(server, output="probability")))


@pytest.mark.parametrize(
    ("query", "fields", "same"),
    [
        ({}, {"om": "true"}, {"output": "probability"}),  # rembg's mask is its soft map
        ({}, {"om": "true", "ppm": "true"}, {"output": "mask"}),  # thresholded to 0/255
        # rembg's cut-out has its soft map as alpha; with a=true, its matting: the service's matte.
        ({}, {"om": "true", "a": "true"}, {"output": "probability", "refine": "true"}),
        ({}, {"ppm": "true"}, {"output": "cutout", "alpha": "soft"}),
        (
            {"bgc": "255,255,255,255"},
            {},
            {"output": "cutout", "alpha": "soft", "bg_color": "ffffff"},
        ),
        ({"bgc": "0,0,255,128"}, {}, {"output": "cutout", "alpha": "soft", "bg_color": "0000ff80"}),
        ({"bgc": "10,20,30"}, {}, {"output": "cutout", "alpha": "soft", "bg_color": "0a141e"}),
        ({}, {"a": "true"}, {"output": "cutout", "alpha": "matte"}),
        (
            {},
            {"a": "true", "af": "240", "ab": "10", "ae": "10"},
            {"output": "cutout", "alpha": "matte"},
        ),
        ({}, {"model": "u2netp"}, {"output": "cutout", "alpha": "soft"}),
        ({}, {"extras": "{}"}, {"output": "cutout", "alpha": "soft"}),
    ],
)
def test_each_option_is_segments_option(
    server: str, query: dict[str, str], fields: dict[str, str], same: dict[str, str]
) -> None:
    r = upload(server, query, **fields)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(image(r), image(segment(server, **same)))


@pytest.mark.parametrize(
    ("query", "fields", "status", "code", "named"),
    [
        # Values that are not valid: 422, as rembg's FastAPI app answers them.
        ({}, {"om": "maybe"}, 422, "invalid_parameter", "om"),
        ({}, {"af": "300"}, 422, "invalid_parameter", "af"),
        ({"bgc": "red"}, {}, 422, "invalid_parameter", "bgc"),
        ({"bgc": "256,0,0"}, {}, 422, "invalid_parameter", "bgc"),
        ({}, {"model": "u2net_human_seg"}, 422, "invalid_parameter", "model"),
        ({}, {"colour": "red"}, 422, "invalid_parameter", "colour"),
        ({"om": "true"}, {"om": "true"}, 422, "invalid_parameter", "om"),  # given twice
        ({"bgc": "1,2,3"}, {"om": "true"}, 422, "invalid_parameter", "bgc"),
        # Valid for rembg, beyond this service: 400, never ignored.
        ({}, {"a": "true", "af": "200"}, 400, "unsupported_parameter", "af"),
        ({}, {"ae": "15"}, 400, "unsupported_parameter", "ae"),
        ({}, {"dc": "true"}, 400, "unsupported_parameter", "dc"),
        ({}, {"vm": "true"}, 400, "unsupported_parameter", "vm"),
        ({"extras": '{"model_path": "/x.onnx"}'}, {}, 400, "unsupported_parameter", "extras"),
    ],
)
def test_what_is_not_valid_or_cannot_be_honoured_is_refused(
    server: str,
    query: dict[str, str],
    fields: dict[str, str],
    status: int,
    code: str,
    named: str,
) -> None:
    r = upload(server, query, **fields)
    assert_rembg_error(r, status, code)
    assert named in r.json()["detail"]


def test_what_is_no_image_request(server: str, photos: str) -> None:
    get = f"{server}/api/remove"
    assert_rembg_error(httpx.get(get, timeout=30), 422, "invalid_parameter")  # no url
    no_file = httpx.post(get, data={"om": "true"}, timeout=30)
    assert_rembg_error(no_file, 422, "invalid_parameter")
    assert "file" in no_file.json()["detail"]
    r = httpx.post(get, files={"file": ("notes.txt", b"not a photo", "text/plain")}, timeout=30)
    assert_rembg_error(r, 415, "unsupported_image")
    # URLs are refused as rembg refuses them: 400.
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/horse.jpg"):
        r = httpx.get(get, params={"url": url}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["code"] in ("invalid_url", "url_forbidden")
    assert_rembg_error(
        httpx.get(get, params={"url": f"{photos}/page"}, timeout=30), 415, "unsupported_image"
    )


def test_requests_are_counted_under_their_api(server: str) -> None:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    before = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("u2serve_requests_total{") and 'api="rembg"' in line
    )
    assert upload(server).status_code == 200
    text = httpx.get(f"{server}/metrics", timeout=30).text
    after = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("u2serve_requests_total{") and 'api="rembg"' in line
    )
    assert after == before + 1


def test_the_document_lists_the_api_under_its_tag(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    path = spec["paths"]["/api/remove"]
    assert path["get"]["tags"] == path["post"]["tags"] == ["rembg"]
    model = next(p for p in path["get"]["parameters"] if p["name"] == "model")
    assert model["schema"]["enum"] == ["u2netp"]
    assert "tags" not in spec["paths"]["/segment"]["post"]
    # One route serves both methods, so that a 405 names both (found by schemathesis).
    r = httpx.put(f"{server}/api/remove", timeout=30)
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}


async def test_every_api_shares_one_queue(
    u2netp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/segment, remove.bg's and rembg's requests wait in the same bounded queue: a full one
    refuses each with 503 and Retry-After, in its API's own error shape."""
    s = settings(
        u2netp_weights, max_batch_size=1, max_queue=2, max_batch_wait_ms=0, codec_threads=1
    )
    async with running(s) as (app, c):
        rt = app.state.runtime
        gate = Gate(monkeypatch, rt.segmenter)

        def send(i: int) -> Awaitable[httpx.Response]:
            if i % 3 == 0:
                return c.post("/segment", content=PHOTO, headers={"content-type": "image/jpeg"})
            if i % 3 == 1:
                return c.post("/v1.0/removebg", files={"image_file": ("h.jpg", PHOTO)})
            return c.post("/api/remove", files={"file": ("h.jpg", PHOTO)})

        sent = [asyncio.ensure_future(send(i)) for i in range(12)]
        # Every request refused, or held by the worker, or waiting in the full queue.
        await until(lambda: sum(f.done() for f in sent) + gate.held + rt.batcher.depth == 12)
        gate.opened.set()
        rs = await asyncio.gather(*sent)
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    # The bound is one for all: two waiting beyond one image at the network and one on the
    # codec thread (service/core/admission.py).
    assert codes.count(200) == 4
    for i, r in enumerate(rs):
        if r.status_code != 503:
            continue
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        if i % 3 == 0:  # /segment's shape
            assert body["error"]["code"] == "overloaded", body
        elif i % 3 == 1:  # remove.bg's
            assert body["errors"][0]["code"] == "overloaded", body
        else:  # rembg's: FastAPI's detail, and the code
            assert body["code"] == "overloaded", body
