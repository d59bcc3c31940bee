"""The pool of working buffers (model/scratch.py): a buffer is lent again only once nothing made
from it is alive, what it holds stays within its bound, and the answers written into a buffer a
previous request left dirty are the bytes of fresh memory."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from model import scratch
from model.postprocess import finish_on_cpu, level_cut
from model.scratch import MIN_BYTES, BufferPool
from service.core.budget import MemoryBudget
from service.core.service import MemoryReturn
from service.images.codecs import Reduction
from service.images.decode import decode, read_header
from service.metrics import Metrics

MB = 1 << 20


def test_a_buffer_is_lent_again_only_once_every_array_made_from_it_is_gone() -> None:
    pool = BufferPool(64 * MB)
    a = pool.array((1000, 1000), np.float32)
    assert a.shape == (1000, 1000)
    assert a.dtype == np.float32
    assert a.flags.c_contiguous
    b = pool.array((1000, 1000), np.float32)
    assert not np.shares_memory(a, b)
    row = a[3]  # a view of a outlives a
    del a
    c = pool.array((999, 1001), np.float32)
    assert not np.shares_memory(c, row)
    assert not np.shares_memory(c, b)
    assert pool.held_bytes == 3 * 4 * MB  # 4 000 000 bytes each, kept rounded up to 4 MiB
    del row
    d = pool.array((1000, 1000), np.float32)  # the first buffer, free again
    assert pool.held_bytes == 3 * 4 * MB
    assert not np.shares_memory(d, b)
    assert not np.shares_memory(d, c)


def test_what_it_keeps_unused_stays_within_its_bound() -> None:
    pool = BufferPool(10 * MB)
    big = pool.array((11 * MB,), np.uint8)  # over the bound: it could never be kept
    assert pool.held_bytes == 0
    assert big.size == 11 * MB
    # Lent buffers are their requests' (charged by the memory budget): not bounded here.
    a, b, c = (pool.array((n * MB,), np.uint8) for n in (6, 3, 4))
    assert pool.held_bytes == 13 * MB
    del a, b, c
    d = pool.array((3 * MB,), np.uint8)  # the least unused that fits: 3 MiB
    assert pool.held_bytes == 13 * MB  # 10 MiB unused: within the bound
    del d
    e = pool.array((9 * MB,), np.uint8)  # none fits: a new one, and 13 MiB unused beside it
    assert pool.held_bytes == (4 + 6 + 9) * MB  # the smallest unused (3 MiB) went
    del e
    pool.clear()
    assert pool.held_bytes == 0


def test_small_needs_and_buffers_twice_the_need_are_not_lent() -> None:
    pool = BufferPool(64 * MB)
    pool.array((MIN_BYTES - 1,), np.uint8)
    assert pool.held_bytes == 0  # left to the heap
    big = pool.array((40 * MB,), np.uint8)
    del big
    small = pool.array((4 * MB,), np.uint8)
    assert pool.held_bytes == 44 * MB
    del small


def _dirty(shape: tuple[int, ...], dtype: type[np.generic], value: float) -> None:
    """Leave garbage in the pool's next buffer for ``shape``."""
    scratch.clear()
    scratch.array(shape, dtype)[...] = value


def test_a_dirty_buffer_gives_the_map_back_its_bytes() -> None:
    rng = np.random.default_rng(5)
    levels = cv2.GaussianBlur(rng.integers(0, 256, (320, 320), dtype=np.uint8), (0, 0), 6)
    for h, w in [(1500, 2000), (1499, 2001), (2000, 1500)]:
        fresh = cv2.resize(levels.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        _dirty((h + 7, w + 3), np.float32, np.nan)
        mask = finish_on_cpu(levels, (h, w), probability=False, threshold=0.5)
        np.testing.assert_array_equal(mask, cv2.compare(fresh, level_cut(0.5), cv2.CMP_GE))
        _dirty((h + 7, w + 3), np.float32, 3e38)
        soft = finish_on_cpu(levels, (h, w), probability=True, threshold=0.5)
        expected = np.clip(np.rint(fresh / np.float32(255) * np.float32(255)), 0, 255)
        np.testing.assert_array_equal(soft, expected.astype(np.uint8))
        assert scratch.held_bytes() > 0


def _jpeg(h: int, w: int, orientation: int = 1) -> bytes:
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("reduce", [None, Reduction(min_side=320, max_factor=2)])
def test_a_dirty_buffer_gives_the_decode_its_pixels(
    orientation: int, reduce: Reduction | None
) -> None:
    data = _jpeg(1400, 1900, orientation)
    header = read_header(data, max_pixels=10**8)
    assert header.decoder == "turbojpeg"
    scratch.clear()
    expected = decode(data, max_pixels=10**8, reduce=reduce).rgb.copy()
    for value in (0, 255, 77):
        _dirty(expected.shape, np.uint8, value)
        _dirty((1400, 1900, 3), np.uint8, value)
        np.testing.assert_array_equal(decode(data, max_pixels=10**8, reduce=reduce).rgb, expected)
    with Image.open(io.BytesIO(data)) as im:
        from PIL import ImageOps

        pillow = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    if reduce is None:
        np.testing.assert_array_equal(expected, pillow)


def test_a_decoded_photo_keeps_its_pixels_while_others_are_decoded() -> None:
    a_bytes, b_bytes = _jpeg(1200, 1600), _jpeg(1200, 1600, orientation=3)
    a = decode(a_bytes, max_pixels=10**8).rgb
    kept = a.copy()
    for _ in range(3):
        b = decode(b_bytes, max_pixels=10**8).rgb
        assert not np.shares_memory(a, b)
        del b
    np.testing.assert_array_equal(a, kept)


def _gauge(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


def test_the_service_shows_and_empties_what_is_kept_when_nothing_is_held() -> None:
    metrics, pool = Metrics(), ThreadPoolExecutor(1)
    budget = MemoryBudget(
        10**9, metrics=metrics, retry_after=lambda: 1, on_idle=MemoryReturn(pool, metrics)
    )
    scratch.clear()
    levels = np.full((320, 320), 200, np.uint8)
    with budget.charge(10**6), budget.charge(10**6):
        mask = finish_on_cpu(levels, (2000, 2000), probability=False, threshold=0.5)
        float_map = 16 * MB  # 16 000 000 bytes, rounded up: unused once finish_on_cpu returned
        assert scratch.unused_bytes() == float_map
        assert scratch.held_bytes() == float_map + 4 * MB
        del mask
    # The first release showed the request's buffers unused, beyond any charge; the last one
    # (the budget idle) emptied the pool, on the codec pool's thread.
    pool.shutdown(wait=True)
    assert scratch.held_bytes() == 0
    assert _gauge(metrics, "u2serve_kept_buffers_bytes") == 0
    assert _gauge(metrics, "u2serve_memory_held_bytes") == 0


def test_a_release_shows_what_is_kept_unused() -> None:
    metrics = Metrics()
    budget = MemoryBudget(10**9, metrics=metrics, retry_after=lambda: 1)  # no idle hook
    scratch.clear()
    with budget.charge(10**6):
        finish_on_cpu(np.zeros((320, 320), np.uint8), (2000, 2000), probability=True, threshold=0.5)
    assert _gauge(metrics, "u2serve_kept_buffers_bytes") == scratch.unused_bytes() > 0
