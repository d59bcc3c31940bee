"""The page at ``/`` and the docs at ``/docs`` in a real browser (Debian's chromium, driven by
Playwright), against a real server process, with every request off the server refused."""

from __future__ import annotations

import base64
import http.server
import io
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import reference_dir, require_system_tool
from .procs import serving, u2netp_env

pytestmark = pytest.mark.integration

API_KEY = "page-test-key"
HORSE = "horse.jpg"  # 770×595
# Where a person finds the screenshots after a run, besides pytest's own tmp dir.
SCREENSHOTS = Path(tempfile.gettempdir()) / "u2serve-screenshots"

# The alpha channel of the page's result image, as the browser decoded it.
_ALPHA_JS = """(img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
  let s = "";
  for (let i = 3; i < rgba.length; i += 4) s += String.fromCharCode(rgba[i]);
  return btoa(s);
}"""

# The first (red) channel of the page's result image: a one-channel map's levels.
_RED_JS = _ALPHA_JS.replace("let i = 3", "let i = 0")


PHOTO_HOST = "127.0.0.2"  # where the photo by URL is served; the service's allow list has it
FETCHED: list[str] = []  # the paths the photo server was asked for


@pytest.fixture(scope="module")
def photo_url() -> Iterator[str]:
    """A real HTTP server on 127.0.0.2 that serves the reference photos."""
    folder = str(reference_dir() / "images")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=folder, **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            FETCHED.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer((PHOTO_HOST, 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{PHOTO_HOST}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(u2netp_weights: Path) -> Iterator[str]:
    env = u2netp_env(u2netp_weights, U2SERVE_API_KEY=API_KEY, U2SERVE_URL_ALLOW=PHOTO_HOST)
    with serving(env) as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = require_system_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: object, server: str) -> Iterator[tuple[object, list[str]]]:
    """A fresh page that may reach the server and nothing else; the list collects what it tried
    to fetch from elsewhere (a CDN, fonts), which must stay empty."""
    from playwright.sync_api import Browser, Route

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    elsewhere: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    p = context.new_page()
    p.set_default_timeout(60_000)
    try:
        yield p, elsewhere
    finally:
        context.close()


def _keep(shot: Path) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    copy = SCREENSHOTS / shot.name
    shutil.copyfile(shot, copy)
    print(f"screenshot: {copy}")
    return copy


def _alpha(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGBA"
        return np.asarray(im)[..., 3]


def test_page_segments_a_photo_like_the_api(
    page: tuple[object, list[str]], server: str, photo_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    p, elsewhere = page
    assert isinstance(p, Page)
    photo = reference_dir() / "images" / HORSE
    p.goto(server + "/")
    expect(p.locator("#options select").first).to_be_visible()
    # Every control has a label (or an aria-label) for screen readers.
    unlabelled = p.locator("input, select, button").evaluate_all(
        "els => els.filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
        " && !e.textContent.trim()).map(e => e.outerHTML)"
    )
    assert unlabelled == []
    # The options come from /openapi.json; set a few through their labels, as a person would.
    p.get_by_label("output", exact=True).select_option("cutout")
    p.get_by_label("threshold", exact=True).fill("0.3")

    # No key yet: the service's 401 is shown and the key field is opened and focused.
    p.get_by_label("Images").set_input_files(str(photo))
    first = p.locator(".result").first
    expect(first).to_have_attribute("data-state", "error")
    expect(first.get_by_role("alert")).to_contain_text("unauthorized")
    expect(p.get_by_label("API key")).to_be_focused()

    p.get_by_label("API key").fill(API_KEY)
    p.get_by_role("button", name="Segment", exact=True).click()
    result = p.locator(".result").first
    expect(result).to_have_attribute("data-state", "done")
    shown = result.locator("img.output")
    size = shown.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    with Image.open(photo) as im:
        assert size == list(im.size)
    expect(result.locator(".timing")).to_contain_text("infer")
    expect(result.locator("a.download")).to_have_attribute("download", "horse.png")

    answer = httpx.post(
        f"{server}/segment",
        params={"output": "cutout", "threshold": "0.3"},
        files={"image": (HORSE, photo.read_bytes(), "image/jpeg")},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    expected = _alpha(answer.content)
    seen = np.frombuffer(base64.b64decode(shown.evaluate(_ALPHA_JS)), np.uint8)
    assert seen.size == expected.size
    np.testing.assert_array_equal(seen.reshape(expected.shape), expected)
    assert 0 < (expected > 0).mean() < 1  # a real cut-out, not all or nothing

    # The model is one of the options, offered from the service's own document.
    expect(p.get_by_label("model", exact=True)).to_have_value("u2netp")
    # An image by URL: fetched by the service (the page loads nothing from elsewhere), with
    # the same options, so the same cut-out comes back.
    p.get_by_label("Or an image's URL").fill(f"{photo_url}/{HORSE}")
    p.get_by_role("button", name="Segment the URL").click()
    fetched = p.locator(".result").first
    expect(fetched).to_have_attribute("data-state", "done")
    expect(fetched.locator(".timing")).to_contain_text("fetch")
    expect(fetched.locator("a.download")).to_have_attribute("download", "horse.png")
    seen = np.frombuffer(
        base64.b64decode(fetched.locator("img.output").evaluate(_ALPHA_JS)), np.uint8
    )
    np.testing.assert_array_equal(seen.reshape(expected.shape), expected)
    # A URL the service may not fetch from: its refusal is shown.
    p.get_by_label("Or an image's URL").fill(f"{server}/static/favicon.svg")
    p.get_by_label("Or an image's URL").press("Enter")
    refused = p.locator(".result").first
    expect(refused).to_have_attribute("data-state", "error")
    expect(refused.get_by_role("alert")).to_contain_text("url_forbidden")

    # A file that is no image: the service's own message is shown.
    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo")
    p.get_by_label("Images").set_input_files(str(bad))
    failed = p.locator(".result").first
    expect(failed).to_have_attribute("data-state", "error")
    expect(failed.get_by_role("alert")).to_contain_text("unsupported_image: not an image")

    shot = tmp_path / "page.png"
    p.screenshot(path=str(shot), full_page=True)
    _keep(shot)
    # A phone's width: everything fits, nothing scrolls sideways.
    p.set_viewport_size({"width": 390, "height": 844})
    assert p.evaluate("document.documentElement.scrollWidth") <= 390
    phone = tmp_path / "page-phone.png"
    p.screenshot(path=str(phone), full_page=True)
    _keep(phone)
    assert elsewhere == []


def test_docs_render_offline(page: tuple[object, list[str]], server: str, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    p, elsewhere = page
    assert isinstance(p, Page)
    p.goto(server + "/docs")
    operation = p.locator(".opblock-summary-path", has_text="/segment")
    expect(operation).to_be_visible()
    expect(p.locator(".opblock-summary-path", has_text="/readyz")).to_be_visible()
    shot = tmp_path / "docs.png"
    p.screenshot(path=str(shot))
    _keep(shot)
    assert elsewhere == []
    assert httpx.get(f"{server}/redoc").status_code == 404  # it would fetch a logo from a CDN


def test_changing_an_option_rerenders_from_the_image_id(
    page: tuple[object, list[str]], server: str
) -> None:
    """The photo is sent once; each later option asks by its id, with an empty body, and the
    service answers from its map cache. An id it no longer has falls back to uploading."""
    from playwright.sync_api import Page, Request, Response, expect

    p, elsewhere = page
    assert isinstance(p, Page)
    photo = reference_dir() / "images" / HORSE
    sent: list[Request] = []
    answers: list[Response] = []
    p.on("request", lambda r: sent.append(r) if "/segment" in r.url else None)
    p.on("response", lambda r: answers.append(r) if "/segment" in r.url else None)
    p.goto(server + "/")
    expect(p.locator("#options select").first).to_be_visible()
    p.locator("#auth summary").click()
    p.get_by_label("API key").fill(API_KEY)
    p.get_by_label("output", exact=True).select_option("cutout")
    p.get_by_label("Images").set_input_files(str(photo))
    card = p.locator(".result").first
    expect(card).to_have_attribute("data-state", "done")
    first_id = card.get_attribute("data-image-id")
    assert first_id
    assert len(first_id) == 22
    # (Playwright shows a multipart body's file part without the file's bytes.)
    assert len(sent) == 1
    assert b'name="image"' in (sent[0].post_data_buffer or b"")

    # Another output: asked by id, nothing uploaded, the map from the cache.
    with p.expect_response(lambda r: "/segment" in r.url) as waited:
        p.get_by_label("output", exact=True).select_option("probability")
    answer = waited.value
    expect(card).to_have_attribute("data-state", "done")
    assert answer.status == 200
    assert f"image_id={first_id}" in answer.url
    assert "output=probability" in answer.url
    assert not sent[-1].post_data_buffer
    assert "cache;dur=" in answer.headers["server-timing"]
    assert 'desc="hit"' in answer.headers["server-timing"]
    expected = httpx.post(
        f"{server}/segment",
        params={"output": "probability"},
        files={"image": (HORSE, photo.read_bytes(), "image/jpeg")},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    seen = np.frombuffer(base64.b64decode(card.locator("img.output").evaluate(_RED_JS)), np.uint8)
    with Image.open(io.BytesIO(expected.content)) as im:
        levels = np.asarray(im)
    np.testing.assert_array_equal(seen.reshape(levels.shape), levels)
    expect(p.locator(".result")).to_have_count(1)  # the same card, re-rendered

    # An id the service does not have (expired, say): 404, then the photo is uploaded again.
    card.evaluate("el => { el.dataset.imageId = 'AAAAAAAAAAAAAAAAAAAAAA'; }")
    before = len(answers)
    p.get_by_label("output", exact=True).select_option("mask")
    expect(card).to_have_attribute("data-state", "done")
    p.wait_for_function(
        "() => document.querySelector('.result').dataset.imageId !== 'AAAAAAAAAAAAAAAAAAAAAA'"
    )
    assert [r.status for r in answers[before:]] == [404, 200]
    assert b'name="image"' in (sent[-1].post_data_buffer or b"")
    new_id = card.get_attribute("data-image-id")
    assert new_id
    assert new_id not in (first_id, "AAAAAAAAAAAAAAAAAAAAAA")
    assert elsewhere == []


def test_a_photo_by_url_rerenders_from_its_image_id(
    page: tuple[object, list[str]], server: str, photo_url: str
) -> None:
    """A photo by URL gets an image id as an upload does: a changed option asks by that id, and
    the service neither fetches the URL again nor runs the network."""
    from playwright.sync_api import Page, expect

    p, elsewhere = page
    assert isinstance(p, Page)
    p.goto(server + "/")
    expect(p.locator("#options select").first).to_be_visible()
    expect(p.get_by_label("model", exact=True)).to_have_value("u2netp")
    p.locator("#auth summary").click()
    p.get_by_label("API key").fill(API_KEY)
    p.get_by_label("Or an image's URL").fill(f"{photo_url}/boat.jpg")
    p.get_by_role("button", name="Segment the URL").click()
    card = p.locator(".result").first
    expect(card).to_have_attribute("data-state", "done")
    expect(card.locator(".timing")).to_contain_text("fetch")
    image_id = card.get_attribute("data-image-id")
    assert image_id
    fetched = len(FETCHED)
    assert FETCHED[-1] == "/boat.jpg"

    with p.expect_response(lambda r: "/segment" in r.url) as waited:
        p.get_by_label("output", exact=True).select_option("probability")
    answer = waited.value
    expect(card).to_have_attribute("data-state", "done")
    assert answer.status == 200
    assert f"image_id={image_id}" in answer.url
    assert "url=" not in answer.url
    assert 'desc="hit"' in answer.headers["server-timing"]
    assert len(FETCHED) == fetched  # not fetched again
    expect(card.locator("a.download")).to_have_attribute("download", "boat.png")
    assert elsewhere == []
