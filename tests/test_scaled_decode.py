"""``fast``'s reduced decode (service/core/scale.py): masks, soft maps and boxes from a JPEG decoded
at 1/2, 1/4 or 1/8 of its size, answered at the photo's full size and orientation; every other
request, and every input libjpeg-turbo does not take, decodes in full as before."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.core.scale import (
    FULL_FROM_PER_INPUT,
    MAX_FACTOR,
    MIN_SIDE_PER_INPUT,
    decode_tag,
    reduction,
)
from service.errors import ServiceError
from service.images.decode import DecodedImage, Header, Reduction, decode, read_header
from service.params import parse_params

from .conftest import reference_dir
from .test_api import metric, running, settings
from .test_cache import stage

MAX_PIXELS = 50_000_000
SIDE = 320
EIGHTH = Reduction(SIDE, 8)  # the most libjpeg-turbo reduces; the service's own is scale.py's


def _photo(size: tuple[int, int], name: str = "horse.jpg") -> Image.Image:
    with Image.open(reference_dir() / "images" / name) as im:
        return im.convert("RGB").resize(size)


def _jpeg(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **({"quality": 90} | kw))
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _lying(data: bytes, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) claiming ``height`` rows."""
    at = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    return data[: at + 5] + struct.pack(">H", height) + data[at + 7 :]


BIG = (1400, 1000)  # reduced to 1/2 for a 320 side: 700×500
CASES: dict[str, tuple[bytes, tuple[int, int], tuple[int, int] | None]] = {
    # name: (bytes, the answer's (width, height), the reduced decode's size or None: in full)
    "baseline": (_jpeg(_photo(BIG)), BIG, (700, 500)),
    "progressive": (_jpeg(_photo(BIG), progressive=True), BIG, (700, 500)),
    "greyscale": (_jpeg(_photo(BIG).convert("L")), BIG, (700, 500)),
    "CMYK (Pillow's path, in full)": (_jpeg(_photo(BIG).convert("CMYK")), BIG, None),
    "EXIF-rotated": (_jpeg(_photo(BIG), exif=_exif(6)), (1000, 1400), (500, 700)),
    "EXIF-flipped": (_jpeg(_photo(BIG), exif=_exif(4)), BIG, (700, 500)),
    "smaller than the input side": (_jpeg(_photo((300, 200))), (300, 200), None),
    "just over twice the side": (_jpeg(_photo((700, 641))), (700, 641), (350, 321)),
    "eight times the side": (_jpeg(_photo((2600, 2560))), (2600, 2560), (325, 320)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_reduced_decode_keeps_the_photos_size_and_orientation(name: str) -> None:
    data, size, reduced = CASES[name]
    header = read_header(data, max_pixels=MAX_PIXELS)
    full = decode(data, max_pixels=MAX_PIXELS, header=header)
    got = decode(data, max_pixels=MAX_PIXELS, header=header, reduce=EIGHTH)
    assert got.size == full.size == size
    h, w = got.model_rgb.shape[:2]
    if reduced is None:
        assert not got.scaled
        np.testing.assert_array_equal(got.model_rgb, full.model_rgb)
        assert decode_tag((w, h), got.full) == ""
        return
    assert got.scaled
    assert got.full == size
    assert (w, h) == reduced
    assert min(w, h) >= SIDE
    assert got.model_rgb.flags.c_contiguous
    assert got.model_rgb.dtype == np.uint8
    # The same picture, the same way up: the full decode averaged down to it is close (block
    # averages against the IDCT's own reduction: a mean of 0.3-2.4 levels on these photos, the
    # most where a side halves to a fraction; libjpeg-turbo's integer IDCT is the same on
    # every CPU).
    shrunk = np.asarray(Image.fromarray(full.model_rgb).resize((w, h), Image.Resampling.BOX))
    assert np.abs(shrunk.astype(np.int16) - got.model_rgb).mean() < 4
    assert decode_tag((w, h), got.full) == f"/decoded-{w}x{h}"


@pytest.mark.parametrize("height", [1500, 700])
def test_a_jpeg_whose_header_lies_about_its_size_answers_as_in_full(height: int) -> None:
    """A frame header that claims more rows than the data holds (or fewer): whatever the full
    decode answered (Pillow's pixels, or its refusal), the reduced one answers the same."""
    data = _lying(_jpeg(_photo(BIG)), height)
    header = read_header(data, max_pixels=MAX_PIXELS)
    assert header.height == height
    want, got = (_outcome(data, header, reduce) for reduce in (None, EIGHTH))
    if isinstance(want, ServiceError):
        assert isinstance(got, type(want))
        assert (got.status, got.message) == (want.status, want.message)
        return
    assert isinstance(got, DecodedImage)
    assert got.size == want.size
    if not got.scaled:
        np.testing.assert_array_equal(got.model_rgb, want.model_rgb)


def _outcome(data: bytes, header: Header, reduce: Reduction | None) -> DecodedImage | ServiceError:
    try:
        return decode(data, max_pixels=MAX_PIXELS, header=header, reduce=reduce)
    except ServiceError as exc:
        return exc


def test_only_fast_masks_soft_maps_and_boxes_decode_reduced() -> None:
    for precision in ("faithful", "float32"):
        for output in ("mask", "probability", "box", "cutout"):
            assert reduction(precision, parse_params({"output": output}), SIDE) is None
    for output in ("mask", "probability", "box"):
        got = reduction("fast", parse_params({"output": output}), SIDE)
        assert got == Reduction(
            MIN_SIDE_PER_INPUT * SIDE, MAX_FACTOR, full_from=FULL_FROM_PER_INPUT * SIDE
        )
    assert reduction("fast", parse_params({"output": "cutout"}), SIDE) is None
    assert reduction("fast", parse_params({"output": "mask", "refine": "true"}), SIDE) is None


def test_a_photo_past_full_from_decodes_in_full() -> None:
    data = CASES["baseline"][0]  # short side 1000
    assert decode(data, max_pixels=MAX_PIXELS, reduce=Reduction(SIDE, 2, full_from=1001)).scaled
    assert not decode(data, max_pixels=MAX_PIXELS, reduce=Reduction(SIDE, 2, full_from=1000)).scaled


@pytest.mark.parametrize(("factor", "size"), [(8, (325, 320)), (4, (650, 640)), (2, (1300, 1280))])
def test_the_reduction_stops_at_its_largest_factor(factor: int, size: tuple[int, int]) -> None:
    data = CASES["eight times the side"][0]
    got = decode(data, max_pixels=MAX_PIXELS, reduce=Reduction(SIDE, factor))
    assert (got.model_rgb.shape[1], got.model_rgb.shape[0]) == size
    assert got.size == (2600, 2560)


def _png_size(body: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(body)) as im:
        return im.size


async def test_fast_answers_at_full_size_and_never_shares_a_reduced_map(
    u2netp_weights: Path,
) -> None:
    """Under ``fast`` a mask comes from the reduced decode and a cut-out of the same photo from
    the full one: two maps under two keys (two misses), each answer at the photo's size; the
    same mask again is a hit."""
    odd = {name: CASES[name] for name in ("progressive", "greyscale", "EXIF-rotated")}
    async with running(settings(u2netp_weights, precision="fast")) as (_, c):
        data, size, _ = CASES["baseline"]
        r = await c.post("/segment", content=data, params={"output": "mask"})
        assert r.status_code == 200, r.text
        assert _png_size(r.content) == size
        image_id = r.headers["x-image-id"]
        seen = [stage(r, "cache")]
        for output in ("cutout", "mask", "box"):
            r = await c.post("/segment", params={"image_id": image_id, "output": output})
            assert r.status_code == 200, r.text
            seen.append(stage(r, "cache"))
            if output != "box":
                assert _png_size(r.content) == size
            else:
                assert r.json()["image"] == {"width": size[0], "height": size[1]}
        assert seen == ["miss", "miss", "hit", "hit"]
        text = (await c.get("/metrics")).text
        assert metric(text, "u2serve_map_cache_misses_total") == 2
        for name, (data, size, _) in odd.items():
            r = await c.post("/segment", content=data, params={"output": "probability"})
            assert r.status_code == 200, (name, r.text)
            assert _png_size(r.content) == size, name
