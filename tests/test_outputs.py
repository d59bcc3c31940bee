"""What web apps ask of ``POST /segment``: the subject's box, output=box, crop, bg_color, JPEG,
max_side and refine, through HTTP on real photos. Every box is checked against one computed
here with numpy from the ``output=mask`` answer."""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from model.postprocess import finish_on_cpu
from model.segmenter import Segmenter
from service.images import matte

from .conftest import load_rgb, reference_dir
from .test_api import assert_error, opened, photo, post_image, running, settings

HORSE = "horse.jpg"  # 770×595
BOAT = "boat.jpg"
BOX_KEYS = ("left", "top", "width", "height")


# One app for the whole module: starting one per test would be most of the module's time.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(u2netp_weights: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(settings(u2netp_weights)) as (_, c):
        yield c


def numpy_box(fg: np.ndarray) -> dict[str, int] | None:
    """The bounding box of a boolean H×W array, computed independently of the service."""
    ys, xs = np.nonzero(fg)
    if ys.size == 0:
        return None
    return {
        "left": int(xs.min()),
        "top": int(ys.min()),
        "width": int(xs.max() - xs.min() + 1),
        "height": int(ys.max() - ys.min() + 1),
    }


def header_box(r: httpx.Response) -> dict[str, int]:
    return {k: int(r.headers[f"x-foreground-{k}"]) for k in BOX_KEYS}


async def mask_of(c: httpx.AsyncClient, name: str, **params: Any) -> np.ndarray:
    r = await post_image(c, photo(name), **params)
    assert r.status_code == 200, r.text
    return np.asarray(opened(r)) == 255


# -- the box ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [HORSE, BOAT, "whisk.png"])
async def test_box_headers_on_every_output(client: httpx.AsyncClient, name: str) -> None:
    ctype = "image/png" if name.endswith(".png") else "image/jpeg"
    mask_r = await post_image(client, photo(name), ctype=ctype, threshold=0.3)
    fg = np.asarray(opened(mask_r)) == 255
    expected = numpy_box(fg)
    assert expected is not None
    assert header_box(mask_r) == expected
    assert float(mask_r.headers["x-foreground-ratio"]) == pytest.approx(fg.mean(), abs=1e-6)
    for output in ("cutout", "box"):
        # (A cut-out with the mask as alpha; a soft or matte alpha's box is the soft map's.)
        extra = {"alpha": "mask"} if output == "cutout" else {}
        r = await post_image(
            client, photo(name), ctype=ctype, output=output, threshold=0.3, **extra
        )
        assert r.status_code == 200, r.text
        assert header_box(r) == expected, output
        assert r.headers["x-foreground-ratio"] == mask_r.headers["x-foreground-ratio"]
    # The soft map's box: its pixels whose 8-bit level reaches the threshold.
    prob_r = await post_image(client, photo(name), ctype=ctype, output="probability", threshold=0.3)
    levels = np.asarray(opened(prob_r))
    assert header_box(prob_r) == numpy_box(levels >= math.ceil(0.3 * 255))


async def test_output_box_is_small_json(client: httpx.AsyncClient) -> None:
    fg = await mask_of(client, HORSE)
    r = await post_image(client, photo(), output="box")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert len(r.content) < 200
    body = r.json()
    assert body["image"] == {"width": 770, "height": 595}
    assert body["box"] == numpy_box(fg)
    assert body["foreground_ratio"] == pytest.approx(fg.mean(), abs=1e-6)
    assert "crop" not in body
    # With crop: the rectangle a crop would keep, margin included, clipped to the image.
    r = await post_image(client, photo(), output="box", crop="true", crop_margin="10%")
    box = body["box"]
    mx, my = math.ceil(box["width"] / 10), math.ceil(box["height"] / 10)
    left, top = max(0, box["left"] - mx), max(0, box["top"] - my)
    right = min(770, box["left"] + box["width"] + mx)
    bottom = min(595, box["top"] + box["height"] + my)
    assert r.json()["crop"] == {
        "left": left,
        "top": top,
        "width": right - left,
        "height": bottom - top,
    }


async def test_no_foreground_is_explicit(client: httpx.AsyncClient) -> None:
    # A photo shrunk this much averages every map pixel it covers: none reaches 1.0 exactly.
    small = Image.open(io.BytesIO(photo())).convert("RGB").resize((60, 46))
    buf = io.BytesIO()
    small.save(buf, "PNG")
    data = buf.getvalue()
    r = await post_image(client, data, ctype="image/png", threshold=1)
    assert r.status_code == 200, r.text
    assert not (np.asarray(opened(r)) == 255).any()  # the premise: the mask is empty
    assert header_box(r) == dict.fromkeys(BOX_KEYS, 0)
    assert float(r.headers["x-foreground-ratio"]) == 0
    r = await post_image(client, data, ctype="image/png", threshold=1, output="box", crop="true")
    assert r.json() == {
        "image": {"width": 60, "height": 46},
        "box": None,
        "foreground_ratio": 0.0,
        "crop": {"left": 0, "top": 0, "width": 60, "height": 46},
    }
    # Cropping to nothing keeps the whole image.
    r = await post_image(client, data, ctype="image/png", threshold=1, output="cutout", crop="true")
    assert r.status_code == 200, r.text
    assert opened(r).size == (60, 46)


# -- crop --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("margin", "px"), [(None, 0), ("15", 15), ("15px", 15), ("400px", 400)])
async def test_crop_mask_and_cutout(client: httpx.AsyncClient, margin: str | None, px: int) -> None:
    full = await post_image(client, photo(), output="cutout", alpha="mask")
    rgba = np.asarray(opened(full))
    fg = rgba[..., 3] == 255
    box = numpy_box(fg)
    assert box is not None
    left, top = max(0, box["left"] - px), max(0, box["top"] - px)
    right = min(770, box["left"] + box["width"] + px)
    bottom = min(595, box["top"] + box["height"] + px)
    extra = {} if margin is None else {"crop_margin": margin}
    for output in ("mask", "cutout"):
        alpha = {"alpha": "mask"} if output == "cutout" else {}
        r = await post_image(client, photo(), output=output, crop="true", **extra, **alpha)
        assert r.status_code == 200, r.text
        got = np.asarray(opened(r))
        want = rgba[top:bottom, left:right]
        if output == "mask":
            want = np.where(want[..., 3] == 255, 255, 0)
        np.testing.assert_array_equal(got, want)
        # The box in the answer's grid: the margin actually kept on the left and top.
        assert header_box(r) == {
            "left": box["left"] - left,
            "top": box["top"] - top,
            "width": box["width"],
            "height": box["height"],
        }
        assert numpy_box(got[..., 3] == 255 if output == "cutout" else got == 255) == header_box(r)


async def test_crop_margin_in_percent(client: httpx.AsyncClient) -> None:
    box = numpy_box(await mask_of(client, HORSE))
    assert box is not None
    r = await post_image(client, photo(), crop="true", crop_margin="5%")
    mx, my = math.ceil(box["width"] * 5 / 100), math.ceil(box["height"] * 5 / 100)
    w = min(770, box["left"] + box["width"] + mx) - max(0, box["left"] - mx)
    h = min(595, box["top"] + box["height"] + my) - max(0, box["top"] - my)
    assert opened(r).size == (w, h)


# -- background colour and JPEG -----------------------------------------------------------------


async def test_bg_color_opaque_and_translucent(client: httpx.AsyncClient) -> None:
    cut = np.asarray(opened(await post_image(client, photo(), output="cutout", alpha="mask")))
    alpha = cut[..., 3]
    assert {0, 255} == set(np.unique(alpha))
    r = await post_image(client, photo(), output="cutout", alpha="mask", bg_color="#1e90ff")
    assert r.status_code == 200, r.text
    im = opened(r)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert (arr[alpha == 0] == (0x1E, 0x90, 0xFF)).all()
    np.testing.assert_array_equal(arr[alpha == 255], cut[alpha == 255, :3])
    r = await post_image(
        client, photo(), output="cutout", alpha="mask", bg_color="00FF0080", format="webp"
    )
    arr = np.asarray(opened(r))
    assert arr.shape[2] == 4
    assert (arr[alpha == 0] == (0, 255, 0, 0x80)).all()
    np.testing.assert_array_equal(arr[alpha == 255], cut[alpha == 255])


async def test_jpeg_on_colour_with_quality(client: httpx.AsyncClient) -> None:
    on_white = np.asarray(
        opened(await post_image(client, photo(), output="cutout", bg_color="ffffff")),
        dtype=np.int16,
    )
    sizes = {}
    for quality in (30, 95):
        r = await post_image(
            client, photo(), output="cutout", bg_color="ffffff", format="jpeg", quality=quality
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg"
        im = opened(r)
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (770, 595))
        # Lossy, but the same picture: the mean error of JPEG at these qualities is a few levels.
        assert np.abs(np.asarray(im, dtype=np.int16) - on_white).mean() < 6
        sizes[quality] = len(r.content)
    assert sizes[30] < sizes[95] / 2
    r = await post_image(client, photo(), output="cutout", bg_color="ffffff", format="jpeg")
    assert r.status_code == 200, r.text  # quality defaults to 90


# -- max_side ----------------------------------------------------------------------------------


async def test_max_side_scales_down_after_crop(client: httpx.AsyncClient) -> None:
    fg = await mask_of(client, HORSE)
    box = numpy_box(fg)
    assert box is not None
    r = await post_image(client, photo(), max_side=200)
    im = opened(r)
    assert im.size == (200, round(595 * 200 / 770))
    small = np.asarray(im)
    assert set(np.unique(small)) <= {0, 255}  # a mask stays binary
    # The scaled box holds the scaled mask, with at most a pixel of slack on each side.
    hb = header_box(r)
    got = numpy_box(small == 255)
    assert got is not None
    assert hb["left"] <= got["left"] <= hb["left"] + 1
    assert hb["top"] <= got["top"] <= hb["top"] + 1
    assert got["left"] + got["width"] <= hb["left"] + hb["width"] <= got["left"] + got["width"] + 1
    assert got["top"] + got["height"] <= hb["top"] + hb["height"] <= got["top"] + got["height"] + 1
    # Never up; after cropping, the crop's longer side is the one limited.
    assert opened(await post_image(client, photo(), max_side=5000)).size == (770, 595)
    r = await post_image(client, photo(), output="cutout", crop="true", max_side=100)
    w, h = opened(r).size
    assert max(w, h) == 100
    assert w / h == pytest.approx(box["width"] / box["height"], rel=0.02)
    r = await post_image(
        client, photo(), output="cutout", bg_color="000000", max_side=64, format="jpeg"
    )
    assert opened(r).size == (64, round(595 * 64 / 770))
    prob = np.asarray(opened(await post_image(client, photo(), output="probability", max_side=77)))
    assert prob.shape == (60, 77)
    assert len(np.unique(prob)) > 2  # the soft map stays soft


# -- refine ------------------------------------------------------------------------------------


async def test_refine_is_the_refined_pipeline_map(
    client: httpx.AsyncClient, u2netp_weights: Path
) -> None:
    """``refine=true`` is the alpha stage's filter of the pipeline's probability map, with the
    photo as guide: its levels for a probability answer, thresholded for a mask."""
    rgb = load_rgb(reference_dir() / "images" / HORSE).numpy()
    seg = Segmenter("u2netp", u2netp_weights, device="cpu")
    levels = seg.levels([rgb])[0]
    soft = finish_on_cpu(levels, rgb.shape[:2], probability=True, threshold=0.5).copy()
    refined = matte.refine(rgb, soft)
    prob = await post_image(client, photo(), output="probability", refine="true")
    np.testing.assert_array_equal(np.asarray(opened(prob)), refined)
    mask_r = await post_image(client, photo(), refine="true", threshold=0.3)
    mask = np.asarray(opened(mask_r))
    np.testing.assert_array_equal(mask, np.where(refined >= 0.3 * 255, 255, 0))
    assert header_box(mask_r) == numpy_box(mask == 255)
    # Edges move, the subject does not.
    plain = finish_on_cpu(levels, rgb.shape[:2], probability=False, threshold=0.3) == 255
    assert ((mask == 255) & plain).sum() / ((mask == 255) | plain).sum() > 0.95
    assert ((mask == 255) != plain).any()


@pytest.mark.parametrize("size", [(1, 1), (5, 1), (1, 700)])
async def test_tiny_images_with_every_option(
    client: httpx.AsyncClient, size: tuple[int, int]
) -> None:
    crop = (
        Image.open(io.BytesIO(photo()))
        .convert("RGB")
        .crop((300, 200, 300 + size[0], 200 + size[1]))
    )
    buf = io.BytesIO()
    crop.save(buf, "PNG")
    r = await post_image(
        client,
        buf.getvalue(),
        ctype="image/png",
        output="cutout",
        refine="true",
        crop="true",
        crop_margin="50%",
        bg_color="ffffff",
        format="jpeg",
        max_side=3,
        threshold=0,  # everything is foreground, so crop has a box
    )
    assert r.status_code == 200, r.text
    w, h = opened(r).size
    assert max(w, h) == min(3, max(size))
    assert header_box(r) == {"left": 0, "top": 0, "width": w, "height": h}


# -- refused -----------------------------------------------------------------------------------


BAD: list[tuple[dict[str, str], list[str]]] = [
    ({"format": "jpeg"}, ["format=jpeg", "output=mask"]),
    ({"format": "jpeg", "output": "probability"}, ["format=jpeg", "output=probability"]),
    ({"format": "jpeg", "output": "cutout"}, ["format=jpeg", "bg_color", "transparen"]),
    ({"format": "jpeg", "output": "cutout", "bg_color": "ffffff80"}, ["format=jpeg", "bg_color"]),
    ({"bg_color": "ffffff"}, ["bg_color", "output=cutout"]),
    ({"bg_color": "red", "output": "cutout"}, ["bg_color", "#rrggbb"]),
    ({"bg_color": "#12345", "output": "cutout"}, ["bg_color"]),
    ({"quality": "80"}, ["quality", "format=jpeg"]),
    ({"quality": "0", "format": "jpeg"}, ["quality"]),
    ({"crop_margin": "10"}, ["crop_margin", "crop=true"]),
    ({"crop": "true", "crop_margin": "-5"}, ["crop_margin"]),
    ({"crop": "true", "crop_margin": "5em"}, ["crop_margin"]),
    ({"crop": "true", "crop_margin": "5000%"}, ["crop_margin"]),
    ({"crop": "perhaps"}, ["crop"]),
    ({"max_side": "0"}, ["max_side"]),
    ({"max_side": "big"}, ["max_side"]),
    ({"refine": "maybe"}, ["refine"]),
    ({"output": "box", "format": "webp"}, ["format", "output=box"]),
    ({"output": "box", "max_side": "100", "quality": "3"}, ["max_side", "quality", "output=box"]),
    ({"output": "bbox"}, ["output"]),
    ({"cropmargin": "5"}, ["cropmargin", "unknown parameter"]),
]


@pytest.mark.parametrize(("params", "needles"), BAD, ids=[str(p) for p, _ in BAD])
async def test_bad_combinations_are_422_naming_them(
    client: httpx.AsyncClient, params: dict[str, str], needles: list[str]
) -> None:
    for r in (
        await post_image(client, photo(BOAT), **params),
        await client.post(
            "/segment", files={"image": ("b.jpg", photo(BOAT), "image/jpeg")}, data=params
        ),
    ):
        assert_error(r, 422, "invalid_parameter")
        message = r.json()["error"]["message"]
        for needle in needles:
            assert needle in message, message


async def test_openapi_documents_the_box(client: httpx.AsyncClient) -> None:
    op = (await client.get("/openapi.json")).json()["paths"]["/segment"]["post"]
    names = {p["name"] for p in op["parameters"]}
    assert {"crop", "crop_margin", "bg_color", "quality", "max_side", "refine"} <= names
    assert all(p["description"] for p in op["parameters"])
    ok = op["responses"]["200"]
    assert {"image/png", "image/webp", "image/jpeg", "application/json"} <= set(ok["content"])
    assert "X-Foreground-Left" in ok["headers"]
    assert "box" in ok["content"]["application/json"]["schema"]["properties"]


async def test_box_headers_are_exposed_to_browsers(u2netp_weights: Path) -> None:
    async with running(settings(u2netp_weights, cors_origins="https://app.example")) as (_, c):
        r = await c.post(
            "/segment",
            content=photo(BOAT),
            headers={"content-type": "image/jpeg", "origin": "https://app.example"},
        )
        exposed = r.headers["access-control-expose-headers"].lower()
        for name in ("x-foreground-left", "x-foreground-ratio"):
            assert name in exposed
