"""The mask's own PNG coder: every PNG reader gets the mask's pixels back, the stream's checks
(Adler-32, CRCs) hold, it is no larger than libvips' zlib on masks the network makes, and it
leaves a texture to zlib."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import pyvips
from PIL import Image

from model.postprocess import finish_on_cpu
from service.images.codecs import maskpng

MAPS = sorted((Path(__file__).parent / "data" / "reference" / "u2net").glob("*.png"))


def _chunks(body: bytes) -> dict[bytes, bytes]:
    """The PNG's chunks by type, each CRC checked."""
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    out: dict[bytes, bytes] = {}
    i = 8
    while i < len(body):
        (n,) = struct.unpack(">I", body[i : i + 4])
        kind, data = body[i + 4 : i + 8], body[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", body[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + data)
        out[kind] = out.get(kind, b"") + data
        i += 12 + n
    return out


def _check(mask: np.ndarray) -> bytes:
    """Encode, then read back by zlib (its Adler-32 checked), Pillow and OpenCV (libpng)."""
    body = maskpng.encode(mask)
    assert body is not None
    h, w = mask.shape
    chunks = _chunks(body)
    assert chunks[b"IHDR"] == struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert not rows[:, 0].any()  # no row filter
    np.testing.assert_array_equal(rows[:, 1:], mask)
    with Image.open(io.BytesIO(body)) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), mask)
    np.testing.assert_array_equal(
        cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED), mask
    )
    return body


def _vips(mask: np.ndarray) -> bytes:
    """libvips' PNG of a mask, as the service wrote it before (zlib level 2, no filter)."""
    m = np.ascontiguousarray(mask)
    im = pyvips.Image.new_from_memory(m.data, m.shape[1], m.shape[0], 1, "uchar")
    return bytes(im.pngsave_buffer(compression=2, filter=0x08, keep=0))


def _network_mask(path: Path, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """An authors' map at the network's side, mapped back to ``size`` and thresholded as the
    service does it."""
    with Image.open(path) as im:
        levels = np.asarray(im.convert("L").resize((320, 320), Image.Resampling.BILINEAR))
    mask = finish_on_cpu(levels, size, probability=False, threshold=threshold)
    assert mask is not None
    return mask.copy()


def _disc(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    inside = ((x - 0.4 * w) / (0.3 * w + 1)) ** 2 + ((y - 0.6 * h) / (0.35 * h + 1)) ** 2 < 1
    return np.where(inside, 255, 0).astype(np.uint8)


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (1, 2), (2, 1), (3, 3), (1, 4000), (4000, 1), (7, 259), (259, 7), (331, 257)],
)
@pytest.mark.parametrize("kind", ["zeros", "full", "disc", "one pixel", "stripes"])
def test_every_reader_gets_the_mask_back(shape: tuple[int, int], kind: str) -> None:
    h, w = shape
    if kind == "zeros":
        mask = np.zeros(shape, np.uint8)
    elif kind == "full":
        mask = np.full(shape, 255, np.uint8)
    elif kind == "disc":
        mask = _disc(h, w)
    elif kind == "one pixel":
        mask = np.zeros(shape, np.uint8)
        mask[h // 2, w // 2] = 255
    else:  # runs of 1, 2, 3, 258, 259, 260 and 261 bytes, across the rows' ends too
        pattern = np.repeat([0, 255] * 4, [1, 2, 3, 258, 259, 260, 261, 4]) & 0xFF
        mask = np.resize(pattern.astype(np.uint8), shape)
    _check(mask)


def test_runs_longer_than_a_block_over_many_rows() -> None:
    """A run that goes on over thousands of rows (its tokens are written as it goes), and rows
    that each end a block."""
    mask = np.zeros((3000, 2000), np.uint8)
    mask[1500:, :] = 255
    _check(mask)
    _check(np.zeros((20000, 3), np.uint8))
    _check(_disc(1200, 5000))


def test_wider_than_deflates_window() -> None:
    _check(_disc(40, 40000))


def test_any_bytes_come_back_not_only_0_and_255() -> None:
    rng = np.random.default_rng(7)
    levels = np.repeat(rng.integers(0, 256, (60, 40), dtype=np.uint8), 9, axis=1)
    _check(np.repeat(levels, 3, axis=0))


def test_a_crop_of_a_larger_mask() -> None:
    mask = _disc(400, 600)
    _check(mask[37:301, 55:523])  # a view with the larger mask's row stride


@pytest.mark.parametrize("path", MAPS[::3], ids=lambda p: p.stem)
@pytest.mark.parametrize("size", [(320, 427), (1000, 1000), (3000, 4000)])
def test_network_masks_are_no_larger_than_libvips_zlib(path: Path, size: tuple[int, int]) -> None:
    for threshold in (0.2, 0.5, 0.8):
        mask = _network_mask(path, size, threshold)
        assert len(_check(mask)) <= len(_vips(mask))


@pytest.mark.parametrize("level", [0, 255])
@pytest.mark.parametrize("shape", [(640, 480), (3000, 4000)])
def test_no_subject_or_all_subject_is_no_larger_than_libvips_zlib(
    level: int, shape: tuple[int, int]
) -> None:
    """A photo where nothing stands out answers a blank mask: one run over every row."""
    mask = np.full(shape, level, np.uint8)
    assert len(_check(mask)) <= len(_vips(mask))


def test_a_texture_is_left_to_zlib() -> None:
    """Runs too short for a mask: None, and the caller writes libvips' PNG."""
    rng = np.random.default_rng(3)
    noise = np.where(rng.random((600, 800)) < 0.5, 255, 0).astype(np.uint8)
    assert maskpng.encode(noise) is None
    # Small images are always coded: the choice starts past 64 kB of stream.
    _check(noise[:40, :40])


def test_an_empty_array_is_not_coded() -> None:
    assert maskpng.encode(np.zeros((0, 5), np.uint8)) is None
    assert maskpng.encode(np.zeros((5, 0), np.uint8)) is None


def _ellipse(h: int, w: int) -> np.ndarray:
    """A subject's mask made in integers only, so that its bytes are the same on every CPU."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    a, b = 3 * w // 10 + 1, 7 * h // 20 + 1
    inside = (x - 2 * w // 5) ** 2 * b * b + (y - 3 * h // 5) ** 2 * a * a < a * a * b * b
    return np.where(inside, 255, 0).astype(np.uint8)


def _levels() -> np.ndarray:
    rng = np.random.default_rng(7)
    levels = np.repeat(rng.integers(0, 256, (60, 40), dtype=np.uint8), 9, axis=1)
    return np.repeat(levels, 3, axis=0)


# The coder's files, byte for byte, as the commit that split its block writer into named steps
# found them (their sizes, then their SHA-256): a change of the bytes is a choice made here in
# the open, never the side effect of a refactor. Integer masks only: the same bytes on every CPU.
PINNED = {
    "subject": (8637, "a7fda6fe2fb8ac960534cb9b32fa5db5415c616ab3a3a1b6fa22412c62afdcca"),
    # runs of 1-261 bytes, over several blocks of tokens
    "stripes": (34993, "c1c1c80d5f36ff327682beb852638346823c72633f7460a756ba6165b7f6cea1"),
    "levels": (10145, "092f6342360922aa5bfabc26b79b8b6fa3381470e998f997193c2768e52a122b"),
    "blank": (11723, "f277910d438b6a3270f18c63956fd0d2b06ba8243f75bb24cb9480e5b4abe75b"),
    "full": (83, "c3cb579cf56cccf8fe150dde985ff0d598748759aea937e1eb944505411b53d7"),
}


def test_the_coders_bytes_are_pinned() -> None:
    pattern = np.repeat([0, 255] * 4, [1, 2, 3, 258, 259, 260, 261, 4]).astype(np.uint8)
    masks = {
        "subject": _ellipse(1200, 5000),
        "stripes": np.resize(pattern, (4000, 1000)),
        "levels": _levels(),
        "blank": np.zeros((3000, 4000), np.uint8),
        "full": np.full((7, 259), 255, np.uint8),
    }
    for name, mask in masks.items():
        body = _check(mask)
        assert (len(body), hashlib.sha256(body).hexdigest()) == PINNED[name], name
