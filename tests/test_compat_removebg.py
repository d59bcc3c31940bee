"""remove.bg's API (``/v1.0/removebg``, ``/v1.0/account``) against a real service process: first
with remove.bg's own Python client, ``remove-bg-api``, unmodified (only its ``API_URL`` pointed at
the service), then what its other clients send (JSON bodies, ``Accept: application/json``) and
each parameter's translation, every answer held to ``/segment``'s for the same options."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import remove_bg_api
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from remove_bg_api import Errors, RemoveBg

from .conftest import reference_dir
from .procs import file_server, serving, u2netp_env

pytestmark = pytest.mark.integration

KEY = "s3cret"
ALLOWED = "127.0.0.2"  # the photo server's address, which the service is told it may fetch from
HORSE = reference_dir() / "images" / "horse.jpg"  # 770×595: over preview's 0.25 MP
PHOTO = HORSE.read_bytes()
# remove_bg_file reads its input with open(path, "rb").read(), never closing the file: the
# ResourceWarning is the client's, and only that one is let through.
CLIENT_LEAVES_FILES_OPEN = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <_io.FileIO:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="module")
def photos() -> Iterator[str]:
    with file_server(ALLOWED, {"/horse.jpg": (PHOTO, "image/jpeg")}) as base:
        yield base


@pytest.fixture(scope="module")
def server(u2netp_weights: Path, photos: str) -> Iterator[str]:
    env = u2netp_env(u2netp_weights, U2SERVE_API_KEY=KEY, U2SERVE_URL_ALLOW=ALLOWED)
    with serving(env) as (_, url):
        yield url


@pytest.fixture
def client(server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RemoveBg:
    """The client as its README shows it, pointed at the service; run in a folder of its own,
    should it write anything."""
    monkeypatch.setattr(remove_bg_api, "API_URL", f"{server}/v1.0")
    monkeypatch.chdir(tmp_path)
    return RemoveBg(KEY)


def image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def segment(server: str, **params: Any) -> httpx.Response:
    r = httpx.post(
        f"{server}/segment",
        content=PHOTO,
        params=params,
        headers={"content-type": "image/jpeg", "x-api-key": KEY},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r


def total(text: str, name: str, **labels: str) -> float:
    """A counter's samples with these labels, summed over its other labels."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def removebg(
    server: str, key: str = KEY, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    headers = {"x-api-key": key, **(headers or {})}
    return httpx.post(f"{server}/v1.0/removebg", headers=headers, timeout=120, **kw)


def assert_removebg_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    (err,) = r.json()["errors"]
    assert err["code"] == code
    assert err["title"]


# -- the client, unmodified ----------------------------------------------------------------------


@CLIENT_LEAVES_FILES_OPEN
def test_the_client_removes_backgrounds_from_a_file_a_url_and_base64(
    client: RemoveBg, server: str, photos: str, tmp_path: Path
) -> None:
    assert client.account.balance() == 0  # self-hosted: no credits, none charged
    path = tmp_path / "horse.jpg"
    path.write_bytes(PHOTO)
    cutouts = [
        client.remove_bg_file(str(path), size="full"),
        client.remove_bg_url(f"{photos}/horse.jpg", size="full"),
        client.remove_bg_base64(base64.b64encode(PHOTO).decode(), size="full"),
    ]
    matte = image(segment(server, output="cutout", alpha="matte").content)
    for cutout in cutouts:
        rgba = image(cutout)
        assert rgba.shape == (595, 770, 4)  # the photo's size
        np.testing.assert_array_equal(rgba, matte)  # the service's matte, as remove.bg's
    assert client.account.balance() == 0
    assert list(tmp_path.iterdir()) == [path]  # raw=True: nothing written


@CLIENT_LEAVES_FILES_OPEN
def test_the_clients_default_size_is_a_preview_of_at_most_a_quarter_megapixel(
    client: RemoveBg, server: str, tmp_path: Path
) -> None:
    path = tmp_path / "horse.jpg"
    path.write_bytes(PHOTO)
    preview = image(client.remove_bg_file(str(path)))  # the client sends size=preview
    h, w = preview.shape[:2]
    assert w * h <= 250_000
    assert w * h > 0.99 * 250_000  # as large as it may be: one row or column from the bound
    assert abs(w / h - 770 / 595) < 0.01
    # The same scaling as /segment's max_side, to the same pixels.
    same = image(segment(server, output="cutout", alpha="matte", max_side=max(w, h)).content)
    np.testing.assert_array_equal(preview, same)


@CLIENT_LEAVES_FILES_OPEN
def test_a_non_image_raises_the_clients_400_error(client: RemoveBg, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a photo")
    with pytest.raises(Errors.ApiErrorCode400):
        client.remove_bg_file(str(path))
    with pytest.raises(Errors.ApiErrorCode400):
        client.remove_bg_base64(base64.b64encode(b"not a photo").decode())
    with pytest.raises(Errors.ApiErrorCode400):
        client.remove_bg_base64("no base64 at all!")


@CLIENT_LEAVES_FILES_OPEN
def test_a_wrong_key_raises_the_clients_403_error(
    client: RemoveBg, server: str, tmp_path: Path
) -> None:
    with pytest.raises(Errors.ApiErrorCode403):
        RemoveBg("wrong")  # it asks for the account's balance first
    path = tmp_path / "horse.jpg"
    path.write_bytes(PHOTO)
    client.change_api_key("wrong")
    with pytest.raises(Errors.ApiErrorCode403):
        client.remove_bg_file(str(path))
    assert_removebg_error(
        removebg(server, key="wrong", data={"image_url": "x"}), 403, "auth_failed"
    )
    assert_removebg_error(httpx.get(f"{server}/v1.0/account", timeout=30), 403, "auth_failed")


# -- what other clients send ---------------------------------------------------------------------


def test_a_json_body_and_a_json_answer(server: str) -> None:
    """As remove.bg's Node client sends it: JSON, and Accept: application/json."""
    body = {"image_file_b64": base64.b64encode(PHOTO).decode(), "size": "auto", "crop": True}
    r = removebg(server, json=body, headers={"accept": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    data = r.json()["data"]
    rgba = image(base64.b64decode(data["result_b64"]))
    expected = segment(server, output="cutout", alpha="matte", crop="true")
    np.testing.assert_array_equal(rgba, image(expected.content))
    for side in ("top", "left", "width", "height"):
        assert data[f"foreground_{side}"] == int(r.headers[f"x-foreground-{side}"])
    assert (r.headers["x-width"], r.headers["x-height"]) == (str(rgba.shape[1]), str(rgba.shape[0]))


def test_headers(server: str) -> None:
    r = removebg(server, files={"image_file": ("h.jpg", PHOTO)}, data={"size": "full"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert (r.headers["x-width"], r.headers["x-height"]) == ("770", "595")
    assert r.headers["x-credits-charged"] == "0"
    assert r.headers["x-type"] == "other"  # auto: the service does not classify
    reference = segment(server, output="cutout", alpha="matte")
    for side in ("Top", "Left", "Width", "Height"):
        assert r.headers[f"X-Foreground-{side}"] == reference.headers[f"X-Foreground-{side}"]
    typed = removebg(
        server, data={"image_file_b64": base64.b64encode(PHOTO).decode(), "type": "animal"}
    )
    assert typed.headers["x-type"] == "animal"
    untyped = removebg(server, files={"image_file": ("h.jpg", PHOTO)}, data={"type_level": "none"})
    assert untyped.status_code == 200
    assert "x-type" not in untyped.headers


@pytest.mark.parametrize(
    ("fields", "same"),
    [
        ({"channels": "alpha"}, {"output": "mask"}),
        (
            {"crop": "true", "crop_margin": "10%"},
            {"output": "cutout", "alpha": "matte", "crop": "true", "crop_margin": "10%"},
        ),
        (
            {"crop": "true", "crop_margin": "20px 20px"},
            {"output": "cutout", "alpha": "matte", "crop": "true", "crop_margin": "20"},
        ),
        ({"bg_color": "81d4fa77"}, {"output": "cutout", "alpha": "matte", "bg_color": "81d4fa77"}),
        (
            {"bg_color": "#fff", "format": "png"},
            {"output": "cutout", "alpha": "matte", "bg_color": "ffffff"},
        ),
        ({"format": "webp"}, {"output": "cutout", "alpha": "matte", "format": "webp"}),
    ],
)
def test_each_parameter_is_segments_option(
    server: str, fields: dict[str, str], same: dict[str, str]
) -> None:
    r = removebg(server, files={"image_file": ("h.jpg", PHOTO)}, data={"size": "full", **fields})
    assert r.status_code == 200, r.text
    reference = segment(server, **same)
    assert r.headers["content-type"] == reference.headers["content-type"]
    np.testing.assert_array_equal(image(r.content), image(reference.content))


def test_jpg_is_on_bg_color_or_on_white(server: str) -> None:
    on_green = removebg(server, files={"image_file": ("h.jpg", PHOTO)}, data={"bg_color": "green"})
    assert on_green.headers["content-type"] == "image/jpeg"  # auto: opaque, so JPEG
    r = removebg(
        server, files={"image_file": ("h.jpg", PHOTO)}, data={"size": "full", "format": "jpg"}
    )
    assert r.headers["content-type"] == "image/jpeg"
    reference = segment(server, output="cutout", alpha="matte", bg_color="ffffff", format="jpeg")
    assert r.content == reference.content


def test_zip_holds_the_colour_and_the_alpha(server: str) -> None:
    r = removebg(
        server, files={"image_file": ("h.jpg", PHOTO)}, data={"size": "full", "format": "zip"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["alpha.png", "color.jpg"]
        colour, alpha = z.read("color.jpg"), z.read("alpha.png")
    assert (
        colour
        == segment(server, output="cutout", alpha="matte", bg_color="ffffff", format="jpeg").content
    )
    np.testing.assert_array_equal(image(alpha), image(segment(server, output="mask").content))
    # The alpha matte came from the map cache: the network ran for the colour image only.
    timing = [entry.strip() for entry in r.headers["server-timing"].split(",")]
    (alpha_cache,) = [entry for entry in timing if entry.startswith("alpha_cache;")]
    assert alpha_cache.endswith('desc="hit"')


def test_no_subject_is_unknown_foreground(server: str) -> None:
    blank = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(blank, "PNG")
    r = removebg(server, files={"image_file": ("blank.png", blank.getvalue())})
    assert_removebg_error(r, 400, "unknown_foreground")


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"scale": "50%"}, "invalid_parameters", "scale"),
        ({"position": "center"}, "invalid_parameters", "position"),
        ({"roi": "10% 10% 90% 90%"}, "invalid_parameters", "roi"),
        ({"add_shadow": "true"}, "invalid_parameters", "add_shadow"),
        ({"semitransparency": "true"}, "invalid_parameters", "semitransparency"),
        ({"bg_image_url": "https://example.com/bg.jpg"}, "invalid_parameters", "bg_image_url"),
        ({"crop": "true", "crop_margin": "10px 20px"}, "invalid_parameters", "crop_margin"),
        ({"crop_margin": "10%"}, "invalid_parameters", "crop_margin"),
        ({"size": "huge"}, "invalid_parameters", "size"),
        ({"format": "gif"}, "invalid_parameters", "format"),
        ({"bg_color": "not-a-colour"}, "invalid_parameters", "bg_color"),
        ({"channels": "alpha", "format": "jpg"}, "invalid_parameters", "format"),
        ({"format": "zip", "bg_color": "fff"}, "invalid_parameters", "bg_color"),
        ({"treshold": "0.4"}, "invalid_parameters", "treshold"),
        ({"image_url": "http://127.0.0.2/x.jpg"}, "invalid_parameters", "image_url"),  # two sources
    ],
)
def test_what_cannot_be_honoured_is_400_in_remove_bgs_shape(
    server: str, fields: dict[str, str], code: str, named: str
) -> None:
    r = removebg(server, files={"image_file": ("h.jpg", PHOTO)}, data=fields)
    assert_removebg_error(r, 400, code)
    assert named in r.json()["errors"][0]["title"]


def test_image_sources(server: str, photos: str) -> None:
    assert_removebg_error(removebg(server, data={"size": "full"}), 400, "bad_request")
    r = removebg(server, data={"image_url": "http://127.0.0.1:1/horse.jpg"})  # not allowed
    assert_removebg_error(r, 400, "url_forbidden")
    r = removebg(server, data={"image_url": f"{photos}/missing.jpg"})
    assert_removebg_error(r, 400, "fetch_failed")
    r = httpx.post(
        f"{server}/v1.0/removebg?size=full",
        headers={"x-api-key": KEY},
        files={"image_file": ("h.jpg", PHOTO)},
        timeout=60,
    )
    assert_removebg_error(r, 400, "invalid_parameters")  # remove.bg's parameters are the body's


def test_account(server: str) -> None:
    r = httpx.get(f"{server}/v1.0/account", headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 200
    attributes = r.json()["data"]["attributes"]
    assert attributes["credits"] == {"total": 0, "subscription": 0, "payg": 0, "enterprise": 0}
    assert attributes["api"]["sizes"] == "all"


def test_requests_are_counted_under_their_api(server: str) -> None:
    def counts() -> tuple[float, ...]:
        text = httpx.get(f"{server}/metrics", timeout=30).text
        return tuple(
            total(text, "u2serve_requests_total", api=api, status=status)
            for api, status in (("removebg", "200"), ("removebg", "400"), ("segment", "200"))
        )

    before = counts()
    assert removebg(server, files={"image_file": ("h.jpg", PHOTO)}).status_code == 200
    assert removebg(server, data={"scale": "50%"}).status_code == 400
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 0]


def test_the_document_lists_the_api_under_its_tag(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    assert spec["paths"]["/v1.0/removebg"]["post"]["tags"] == ["remove.bg"]
    assert spec["paths"]["/v1.0/account"]["get"]["tags"] == ["remove.bg"]
    assert "tags" not in spec["paths"]["/segment"]["post"]
    body = spec["paths"]["/v1.0/removebg"]["post"]["requestBody"]["content"]
    assert {"image_file", "image_url", "size", "format", "channels"} <= set(
        body["multipart/form-data"]["schema"]["properties"]
    )
