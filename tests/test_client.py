"""``u2serve.Client`` and ``u2serve.AsyncClient`` against real service processes: the answer and
what its headers say, another answer by image id, typed errors for refusals (an unknown id, an
expired one), never a retry of a 4xx, a real 503 waited out or raised once the retry time is
spent, a service that is not up yet, and ``segment_many`` keeping the batcher fed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from u2serve import (
    AsyncClient,
    Box,
    Client,
    ConnectionFailed,
    ImageNotFound,
    InvalidParameter,
    Overloaded,
    Result,
    U2ServeError,
    UnsupportedImage,
)

from .conftest import reference_dir, weights_file
from .procs import (
    distinct_photos,
    free_port,
    scrape,
    serving,
    serving_gated,
    start,
    u2netp_env,
    wait_ready,
)

pytestmark = pytest.mark.integration

SMALL = "girl.png"
PHOTO = "horse.jpg"


def photo(name: str = PHOTO) -> bytes:
    return (reference_dir() / "images" / name).read_bytes()


def raw(url: str, data: bytes, **params: str) -> httpx.Response:
    r = httpx.post(f"{url}/segment", params=params, content=data, timeout=300)
    assert r.status_code == 200, r.text
    return r


def requests_answered(url: str) -> float:
    return scrape(url).get("u2serve_requests_total", 0.0)


def until(condition: Callable[[], bool], limit_s: float = 300) -> None:
    """Wait for ``condition``; only a failing service makes it wait ``limit_s``."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, "the condition was not reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def url(u2netp_weights: Path) -> Iterator[str]:
    with serving(u2netp_env(u2netp_weights)) as (_, url):
        yield url


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url) as c:
        yield c


# -- answers -------------------------------------------------------------------------------------


def test_segment_gives_the_answer_and_what_its_headers_say(client: Client, url: str) -> None:
    expected = raw(url, photo(), output="cutout", format="webp")
    r = client.segment(photo(), output="cutout", format="webp")
    assert r.content == expected.content
    assert r.media_type == "image/webp"
    h = expected.headers
    assert r.box == Box(
        int(h["x-foreground-left"]),
        int(h["x-foreground-top"]),
        int(h["x-foreground-width"]),
        int(h["x-foreground-height"]),
    )
    assert r.box.width > 0
    assert r.foreground_ratio == float(h["x-foreground-ratio"]) > 0
    assert r.image_id
    assert r.image_id != h["x-image-id"]
    assert {"decode", "cache", "encode", "total"} <= r.timings.keys()
    assert r.map_cache == "hit"  # the same photo's map, kept by the first request
    assert r.request_id
    assert r.retries == 0


def test_no_foreground_has_no_box(client: Client) -> None:
    r = client.segment(photo(), output="mask", threshold=1)
    assert r.box is None
    assert r.foreground_ratio == 0


def test_every_kind_of_image(client: Client, tmp_path: Path) -> None:
    """Bytes and paths are sent as they are; a PIL image or an array as a lossless file of its
    pixels, which for a PNG photo are the same pixels: the same answer."""
    path = reference_dir() / "images" / SMALL
    expected = client.segment(path.read_bytes(), output="cutout").content
    with Image.open(path) as im:
        pil = im.convert("RGB")
    for image in (path, str(path), bytearray(path.read_bytes()), pil, np.asarray(pil)):
        assert client.segment(image, output="cutout").content == expected, type(image)


def test_again_answers_from_the_kept_upload(client: Client, url: str) -> None:
    first = client.segment(photo(SMALL), output="mask")
    before = scrape(url).get("u2serve_map_cache_misses_total", 0)
    cutout = client.again(first, output="cutout", format="webp")
    by_id = client.again(first.image_id or "", output="probability")
    assert cutout.image_id == by_id.image_id == first.image_id
    assert cutout.map_cache == by_id.map_cache == "hit"
    assert scrape(url).get("u2serve_map_cache_misses_total", 0) == before  # no network
    assert cutout.content == raw(url, photo(SMALL), output="cutout", format="webp").content
    assert by_id.content == raw(url, photo(SMALL), output="probability").content


def test_again_keeps_the_model_of_the_answer_it_is_given(u2netp_weights: Path) -> None:
    """A U2NETP answer asked for again is U2NETP's, though the service's default is U2NET;
    naming a model asks for that one."""
    weights_file("u2net")
    env = {
        "U2SERVE_MODELS": "u2net,u2netp",
        "U2SERVE_WEIGHTS_DIR": str(u2netp_weights.parent),
        "U2SERVE_DEVICE": "cpu",
        "U2SERVE_MAX_BATCH_WAIT_MS": "0",
        "U2SERVE_WARMUP": "false",
    }
    with serving(env) as (_, url), Client(url) as client:
        first = client.segment(photo(SMALL), output="mask", model="u2netp")
        assert first.model == "u2netp"
        again = client.again(first, output="probability")
        assert again.model == "u2netp"
        assert again.content == raw(url, photo(SMALL), output="probability", model="u2netp").content
        assert client.again(again, output="mask").model == "u2netp"  # and again
        named = client.again(first, output="box", model="u2net")
        assert named.model == "u2net"
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for s in family.samples:
                if s.name == "u2serve_requests_total" and s.labels["status"] == "200":
                    key = (s.labels["model"], s.labels["output"])  # every source's
                    counts[key] = counts.get(key, 0) + s.value
    assert counts == {
        ("u2netp", "mask"): 2,
        ("u2netp", "probability"): 2,
        ("u2net", "box"): 1,
    }


def test_an_image_by_url_is_fetched_by_the_service(client: Client) -> None:
    """A URL is the service's to fetch: here a loopback one, which it refuses (403) without
    fetching; the error says so, typed, with the service's code."""
    with pytest.raises(U2ServeError) as exc:
        client.segment("http://127.0.0.1:9/photo.jpg")
    assert (exc.value.status, exc.value.code) == (403, "url_forbidden")


# -- refusals ------------------------------------------------------------------------------------


def test_an_unknown_id_raises_image_not_found(client: Client, url: str) -> None:
    before = requests_answered(url)
    with pytest.raises(ImageNotFound) as exc:
        client.again("A" * 22, output="cutout")
    assert exc.value.status == 404
    assert exc.value.code == "image_not_found"
    assert "upload the image again" in exc.value.message
    assert exc.value.request_id
    assert requests_answered(url) == before + 1  # asked once


def test_a_422_is_raised_and_never_retried(client: Client, url: str) -> None:
    before = requests_answered(url)
    with pytest.raises(InvalidParameter) as exc:
        client.segment(photo(SMALL), threshold=2, output="cutout")
    assert exc.value.status == 422
    assert exc.value.message == "threshold: Input should be less than or equal to 1"
    with pytest.raises(InvalidParameter, match="image_id: not an image id"):
        client.again("not-an-id")
    with pytest.raises(UnsupportedImage):
        client.segment(b"not an image")
    assert requests_answered(url) == before + 3  # each asked once


def test_a_bad_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("localhost:8000")


def test_no_service_raises_connection_failed() -> None:
    with (
        Client(f"http://127.0.0.1:{free_port()}", retry_s=0) as c,
        pytest.raises(ConnectionFailed) as exc,
    ):
        c.segment(photo(SMALL))
    assert exc.value.status is None
    assert "ConnectError" in exc.value.message


# -- many at once --------------------------------------------------------------------------------


def test_segment_many_yields_every_outcome_as_it_comes(client: Client) -> None:
    images: list[Any] = [*distinct_photos(5), b"not an image"]
    outcomes = list(client.segment_many(images, output="mask"))
    assert sorted(o.index for o in outcomes) == list(range(6))
    for o in outcomes:
        assert o.image is images[o.index]
        if o.index == 5:
            assert isinstance(o.error, UnsupportedImage)
            assert o.result is None
            with pytest.raises(UnsupportedImage):
                o.get()
        else:
            assert o.error is None
            assert o.get().content == client.segment(images[o.index], output="mask").content


def test_segment_many_stops_early_and_reads_images_as_it_goes(client: Client) -> None:
    taken = []

    def images() -> Iterator[bytes]:
        for i, data in enumerate(distinct_photos(50)):
            taken.append(i)
            yield data

    outcomes = client.segment_many(images(), concurrency=2, output="box")
    first = next(outcomes)
    outcomes.close()
    assert first.get().media_type == "application/json"
    assert len(taken) <= 3  # two in flight, and the one taken when the first came back


# -- asyncio -------------------------------------------------------------------------------------


async def test_the_async_client_follows_the_same_rules(url: str) -> None:
    async with AsyncClient(url) as c:
        first = await c.segment(photo(SMALL), output="mask")
        assert first.content == raw(url, photo(SMALL), output="mask").content
        again = await c.again(first, output="box")
        assert again.map_cache == "hit"
        assert again.media_type == "application/json"
        with pytest.raises(ImageNotFound):
            await c.again("B" * 22)
        with pytest.raises(InvalidParameter):
            await c.segment(photo(SMALL), crop_margin="5")
        images = distinct_photos(3)
        done = [o async for o in c.segment_many(images, output="mask")]
        assert sorted(o.index for o in done) == [0, 1, 2]
        assert all(o.get().content == raw(url, images[o.index]).content for o in done)


# -- 503s: a real full queue, held by a gate -----------------------------------------------------


@dataclass
class Gated:
    url: str
    gate: Path

    def held(self) -> bool:
        return Path(f"{self.gate}.pid").exists()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture
def gated(u2netp_weights: Path, tmp_path: Path) -> Iterator[Gated]:
    """One process whose batches wait for a gate file: batches of up to 4, and 9 requests held
    at once (4 waiting beyond a batch and the codec thread: service/core/admission.py)."""
    gate = tmp_path / "gate"
    env = u2netp_env(
        u2netp_weights,
        U2SERVE_MAX_BATCH_SIZE="4",
        U2SERVE_MAX_QUEUE="4",
        U2SERVE_CODEC_THREADS="1",
    )
    with serving_gated(env, gate) as (_, url):
        yield Gated(url, gate)


async def hasty_async(url: str) -> Overloaded:
    async with AsyncClient(url, retry_s=0) as hasty:
        with pytest.raises(Overloaded) as exc:
            await hasty.segment(photo(SMALL))
    return exc.value


def test_a_full_queue_is_waited_out_and_the_batcher_kept_fed(gated: Gated) -> None:
    """With the network held on one photo, segment_many keeps twice the batch in flight: eight
    queued, which fills the queue. A client with no retry time then gets the 503, typed, at
    once (sync and async alike); one with time waits it out and is answered."""
    images = distinct_photos(9)
    outcomes: list[Any] = []
    answers: list[Result] = []
    with Client(gated.url) as client:
        lone = threading.Thread(target=lambda: answers.append(client.segment(images[8])))
        lone.start()
        until(lambda: gated.held() and gated.metric("u2serve_queue_wait_seconds_count") == 1)
        many = threading.Thread(
            target=lambda: outcomes.extend(client.segment_many(images[:8], output="mask"))
        )
        many.start()
        until(lambda: gated.metric("u2serve_queue_depth") == 8)  # 2 × the batch of 4

        with Client(gated.url, retry_s=0) as hasty, pytest.raises(Overloaded) as exc:
            hasty.segment(photo(SMALL))
        assert (exc.value.status, exc.value.code) == (503, "overloaded")
        assert exc.value.retry_after == 1  # no batch has finished: the service's floor
        assert asyncio.run(hasty_async(gated.url)).code == "overloaded"
        assert gated.metric("u2serve_rejected_total", reason="queue_full") == 2  # once each

        patient = threading.Thread(target=lambda: answers.append(client.segment(photo(SMALL))))
        patient.start()
        until(lambda: gated.metric("u2serve_rejected_total", reason="queue_full") >= 3)
        gated.gate.touch()  # the queue drains; the patient client's next try gets in
        for t in (lone, many, patient):
            t.join()
    assert sorted(r.retries > 0 for r in answers) == [False, True]  # the patient one waited
    assert sorted(o.index for o in outcomes) == list(range(8))
    assert all(o.error is None for o in outcomes)
    # The eight kept in flight, queued before the gate opened, filled two batches of four
    # (the histogram's buckets: 1, 2, 4, …); the lone and the patient photos went alone.
    batches = gated.metric("u2serve_batch_size_count")
    assert batches - gated.metric("u2serve_batch_size_bucket", le="2.0") == 2
    assert gated.metric("u2serve_batch_size_sum") == 10


# -- a service that is not up yet, and ids that expire ------------------------------------------


def test_a_service_starting_up_is_waited_for_and_ids_expire(u2netp_weights: Path) -> None:
    """A call made before the service listens waits (refused connections, then 503 while it
    loads) and is answered once it is ready. Its image id is kept for 1 s after its last use:
    past that, ``again`` raises ImageNotFound."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answer: list[Result] = []
    with Client(url, retry_s=600) as client:
        early = threading.Thread(target=lambda: answer.append(client.segment(photo(SMALL))))
        early.start()
        proc = start(u2netp_env(u2netp_weights, U2SERVE_CACHE_UPLOAD_TTL_S="1"), port)
        try:
            wait_ready(url, proc)
            early.join()
            assert answer[0].retries >= 1
            assert answer[0].image_id
            # The id's last use was its upload, before the answer came: 1.5 s later it has
            # expired, however slow the machine.
            time.sleep(1.5)
            with pytest.raises(ImageNotFound):
                client.again(answer[0], output="cutout")
        finally:
            proc.kill()
            proc.communicate(timeout=10)
