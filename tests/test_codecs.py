"""The codec layer's contract: every decoder gives Pillow's pixels for every input it takes, and
every encoder's answers decode to the Pillow encoder's pixels, on every output path."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms

from service.errors import ServiceError, UnsupportedImage
from service.images.codecs import DECODERS, ENCODERS, decoder
from service.images.decode import decode, read_header
from service.images.encode import render
from service.params import SegmentParams

from .conftest import reference_dir

MAX_PIXELS = 50_000_000


def _photo(name: str = "horse.jpg", size: tuple[int, int] = (301, 233)) -> Image.Image:
    with Image.open(reference_dir() / "images" / name) as im:
        return im.convert("RGB").resize(size)


def _jpeg(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **({"quality": 88} | kw))
    return buf.getvalue()


def _save(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _inputs() -> dict[str, tuple[bytes, str]]:
    """Odd inputs, with the decoder the header should choose for each."""
    im = _photo()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cases: dict[str, tuple[bytes, str]] = {}
    for sub in ("4:4:4", "4:2:2", "4:2:0", "4:1:1"):
        cases[f"jpeg {sub}"] = (_jpeg(im, subsampling=sub), "turbojpeg")
        cases[f"jpeg {sub} progressive"] = (
            _jpeg(im, subsampling=sub, progressive=True),
            "turbojpeg",
        )
    cases["jpeg grey"] = (_jpeg(im.convert("L")), "turbojpeg")
    cases["jpeg grey progressive"] = (_jpeg(im.convert("L"), progressive=True), "turbojpeg")
    cases["jpeg restart markers"] = (_jpeg(im, restart_marker_blocks=2), "turbojpeg")
    cases["jpeg optimised tables"] = (_jpeg(im, optimize=True, quality=40), "turbojpeg")
    cases["jpeg ICC (not applied, as before)"] = (_jpeg(im, icc_profile=srgb), "turbojpeg")
    for o in range(1, 9):
        cases[f"jpeg EXIF orientation {o}"] = (_jpeg(im, exif=_exif(o)), "turbojpeg")
    cases["jpeg EXIF orientation 6, grey"] = (_jpeg(im.convert("L"), exif=_exif(6)), "turbojpeg")
    cases["jpeg EXIF orientation 99"] = (_jpeg(im, exif=_exif(99)), "turbojpeg")
    cases["mpo (a phone's JPEG with a second picture)"] = (
        _save(im, "MPO", save_all=True, append_images=[im.rotate(90)]),
        "turbojpeg",
    )
    cases["jpeg CMYK"] = (_jpeg(im.convert("CMYK")), "pillow")
    cases["jpeg CMYK EXIF 8"] = (_jpeg(im.convert("CMYK"), exif=_exif(8)), "pillow")
    whole = _jpeg(im)
    corrupt = bytearray(whole)
    corrupt[len(whole) // 2] ^= 0x5A  # damaged entropy data: Pillow decodes it anyway
    cases["jpeg damaged mid-stream"] = (bytes(corrupt), "turbojpeg")
    for name, path in [(p.name, p) for p in sorted((reference_dir() / "images").glob("*.jp*g"))]:
        cases[f"reference {name}"] = (path.read_bytes(), "turbojpeg")
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    cases["png RGBA"] = (_save(rgba, "PNG"), "pillow")
    cases["png palette with transparency"] = (
        _save(im.convert("P"), "PNG", transparency=3),
        "pillow",
    )
    cases["png 16-bit grey"] = (_save(im.convert("L").convert("I;16"), "PNG"), "pillow")
    cases["webp lossless RGBA"] = (_save(rgba, "WEBP", lossless=True), "pillow")
    cases["tiff CMYK"] = (_save(im.convert("CMYK"), "TIFF"), "pillow")
    cases["gif"] = (_save(im, "GIF"), "pillow")
    cases["bmp"] = (_save(im, "BMP"), "pillow")
    return cases


INPUTS = _inputs()


@pytest.mark.parametrize("name", list(INPUTS))
def test_decode_gives_pillows_pixels(name: str) -> None:
    data, chosen = INPUTS[name]
    header = read_header(data, max_pixels=MAX_PIXELS)
    assert header.decoder == chosen
    want = decoder("pillow").decode(data, header)
    assert want is not None
    got = decode(data, max_pixels=MAX_PIXELS)
    for plane in ("rgb", "alpha", "model_rgb"):
        w, g = getattr(want, plane), getattr(got, plane)
        if w is None:
            assert g is None, plane
        else:
            assert g.dtype == np.uint8
            assert g.flags.c_contiguous  # torch.from_numpy needs both
            assert g.flags.writeable
            np.testing.assert_array_equal(g, w, err_msg=plane)


@pytest.mark.parametrize("name", [n for n, (_, d) in INPUTS.items() if d == "turbojpeg"])
def test_libjpeg_turbo_decodes_every_jpeg_it_is_given_itself(name: str) -> None:
    """The fast path is the one taken (only the damaged file goes back to Pillow)."""
    data, _ = INPUTS[name]
    header = read_header(data, max_pixels=MAX_PIXELS)
    got = decoder("turbojpeg").decode(data, header)
    if "damaged" in name:
        assert got is None
    else:
        assert got is not None
        assert got.size == (
            (header.width, header.height)
            if header.orientation not in (5, 6, 7, 8)
            else (header.height, header.width)
        )


def test_every_decoder_is_tested() -> None:
    assert {d for _, d in INPUTS.values()} == set(DECODERS)


@pytest.mark.parametrize("keep", [2, 300, -2, -1])
def test_truncated_jpeg_is_refused_as_before(keep: int) -> None:
    data = _jpeg(_photo(), progressive=keep < 0)
    cut = data[:keep] if keep > 0 else data[: len(data) // 2]
    with pytest.raises(ServiceError) as pillow_err:
        decoder("pillow").decode(cut, read_header(cut, max_pixels=MAX_PIXELS))
    with pytest.raises(ServiceError) as err:
        decode(cut, max_pixels=MAX_PIXELS)
    assert isinstance(err.value, UnsupportedImage)
    assert (err.value.status, err.value.message) == (
        pillow_err.value.status,
        pillow_err.value.message,
    )


# -- encoders ----------------------------------------------------------------------------------


def _maps(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A soft map (an off-centre blob) and its mask at 0.5."""
    y, x = np.mgrid[0:h, 0:w]
    d = ((x - 0.45 * w) / (0.3 * w)) ** 2 + ((y - 0.55 * h) / (0.35 * h)) ** 2
    soft = np.clip(np.rint(255 * np.exp(-(d**2))), 0, 255).astype(np.uint8)
    return soft, np.where(soft >= 128, 255, 0).astype(np.uint8)


PATHS: list[dict[str, str]] = [
    {"output": "mask"},
    {"output": "probability"},
    {"output": "cutout"},
    {"output": "cutout", "alpha": "mask"},  # the 0/255 alpha's own paths in each encoder
    {"output": "cutout", "alpha": "mask", "bg_color": "1e90ff"},
    {"output": "cutout", "alpha": "mask", "bg_color": "00ff0080"},
    {"output": "cutout", "alpha": "soft"},
    {"output": "cutout", "bg_color": "1e90ff"},
    {"output": "cutout", "bg_color": "00ff0080"},
    {"output": "mask", "crop": "true", "crop_margin": "7"},
    {"output": "probability", "crop": "true"},
    {"output": "cutout", "crop": "true", "crop_margin": "10%"},
    {"output": "cutout", "crop": "true", "bg_color": "ffffff"},
    {"output": "mask", "max_side": "97"},
    {"output": "probability", "max_side": "150"},
    {"output": "cutout", "max_side": "120"},
    {"output": "cutout", "max_side": "120", "bg_color": "000000"},
    {"output": "cutout", "max_side": "64", "bg_color": "ff000040", "crop": "true"},
]


def _opaque(p: dict[str, str]) -> bool:
    bg = p.get("bg_color", "")
    return len(bg) == 6 or (len(bg) == 8 and bg.endswith("ff"))


CASES = [
    (p | {"format": f}, alpha)
    for p in PATHS
    for f in ("png", "webp", "jpeg")
    if f != "jpeg" or _opaque(p)
    for alpha in (False, True)
]


def _decoded(body: bytes) -> tuple[str, tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(body)) as im:
        im.load()
        return im.mode, im.size, np.asarray(im)


@pytest.mark.parametrize("codec", ENCODERS)
@pytest.mark.parametrize(("fields", "alpha"), CASES, ids=[f"{p}-alpha={a}" for p, a in CASES])
def test_every_encoder_gives_pillows_pixels(
    codec: str, fields: dict[str, str], alpha: bool
) -> None:
    data = _jpeg(_photo(size=(331, 257)))
    if alpha:  # a photo with transparency of its own: partial, and some fully transparent
        rgba = _photo(size=(331, 257)).convert("RGBA")
        ramp = np.tile(np.linspace(0, 255, 331).astype(np.uint8), (257, 1))
        rgba.putalpha(Image.fromarray(ramp, "L"))
        data = _save(rgba, "PNG")
    image = decode(data, max_pixels=MAX_PIXELS)
    soft, mask = _maps(*image.rgb.shape[:2])
    params = SegmentParams.model_validate(fields)
    levels = soft if params.soft_map else mask
    want = render(levels, image, params, codec="pillow")
    got = render(levels, image, params, codec=codec)
    assert got.media_type == want.media_type
    assert got.headers == want.headers
    w_mode, w_size, w_px = _decoded(want.body)
    g_mode, g_size, g_px = _decoded(got.body)
    assert (g_mode, g_size) == (w_mode, w_size)
    if params.format == "jpeg":
        # The same libjpeg-turbo settings: the same tables and entropy-coded data from the
        # start of scan on (libvips leaves out the 18-byte JFIF marker), so the same pixels.
        sos = b"\xff\xda"
        assert got.body[got.body.index(sos) :] == want.body[want.body.index(sos) :]
        np.testing.assert_array_equal(g_px, w_px)
    else:
        np.testing.assert_array_equal(g_px, w_px)
    if params.format == "png":  # the faster PNG is no larger
        assert len(got.body) <= len(want.body) * 1.02 + 200
