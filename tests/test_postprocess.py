"""The map back to the photo's size: the CPU's numpy and OpenCV steps (model/postprocess.py)
against PyTorch's (model/torch_stages.py), which the parity bounds were measured with and which
a GPU host still runs on its device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.postprocess import finish_on_cpu, from_levels, resize_levels, to_levels
from model.segmenter import Segmenter
from model.torch_stages import from_levels as torch_from_levels
from model.torch_stages import minmax, resize_map, resize_maps, to_mask, to_probability
from model.torch_stages import to_levels as torch_to_levels

from .conftest import load_rgb, reference_dir


def _torch_reference(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The resize every map went through before: torch's, anti-aliased (``levels``: S×S)."""
    out = F.interpolate(
        levels[None, None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out[0, 0]


@pytest.fixture(scope="module")
def maps(u2netp_weights: Path) -> list[torch.Tensor]:
    """U2NETP's 8-bit 320×320 maps (as floats) of three reference photos."""
    seg = Segmenter("u2netp", u2netp_weights, device="cpu")
    images = [
        load_rgb(reference_dir() / "images" / n) for n in ("bike.jpg", "boat.jpg", "horse.jpg")
    ]
    return [torch.from_numpy(lv.astype(np.float32)) for lv in seg.levels(images)]


def _moved_within_bounds(
    got: torch.Tensor, want: torch.Tensor, pixels: int, flips_at_12mp: int, moved_share: float
) -> None:
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-4
    for threshold in (0.3, 0.5):
        flipped = (to_mask(got, threshold) != to_mask(want, threshold)).sum().item()
        assert flipped <= max(3, flips_at_12mp * pixels / 12e6), (threshold, flipped)
    moved = (to_probability(got).int() - to_probability(want).int()).abs()
    assert moved.max().item() <= 1
    assert (moved > 0).sum().item() <= moved_share * pixels


@pytest.mark.parametrize("size", [(2829, 4243), (4000, 3000), (320, 321), (9000, 320)])
def test_upscale_stays_within_a_handful_of_pixels(
    maps: list[torch.Tensor], size: tuple[int, int]
) -> None:
    # Measured on an AVX-512 Xeon, with OpenCV's SIMD off (its plain C), and with torch held to
    # AVX2 (ATEN_CPU_CAPABILITY=avx2): at most 2.9e-5 apart, 0-7 mask pixels of 12 M flipped,
    # 0.002-0.015% of the soft map's levels moved by one. Bounds: 3x, 7x and 7x that.
    for levels in maps:
        want = _torch_reference(levels, size).div_(255)
        got = torch.from_numpy(from_levels(levels.numpy().astype(np.uint8), size))
        _moved_within_bounds(got, want, size[0] * size[1], 50, 1e-3)


@pytest.mark.parametrize(
    "size", [(200, 300), (100, 100), (1000, 200), (319, 4000), (19, 4000), (1, 700), (3, 3)]
)
def test_reductions_are_pytorchs_antialiased_resize(
    maps: list[torch.Tensor], size: tuple[int, int]
) -> None:
    """Where a side shrinks, numpy's anti-aliased filter (the width, then the height, as
    PyTorch's kernel runs it) against PyTorch's own. Measured on an AMD EPYC with AVX2: at most
    4.6e-5 levels apart (the sums' rounding), no mask pixel flipped and no level moved on these
    maps; bounds as the upscale's."""
    for levels in maps:
        want = _torch_reference(levels, size)
        got = torch.from_numpy(resize_levels(levels.numpy().astype(np.uint8), size))
        assert (got - want).abs().max().item() <= 1e-3
        _moved_within_bounds(got / 255, want / 255, size[0] * size[1], 50, 1e-3)


def test_a_one_pixel_wide_reduction_is_the_filter() -> None:
    """PyTorch's kernel gives every row the same value when the width shrinks to 1 (it reads
    one row's weights for all); numpy's is the filter of each row, as for any other width."""
    levels = np.tile(np.arange(320, dtype=np.float32)[:, None] * (255 / 319), (1, 320))
    got = resize_levels(levels.astype(np.uint8), (700, 1))[:, 0]
    assert np.all(np.diff(got) >= -1e-3)  # rising, to the sums' rounding
    assert got[0] < 2
    assert got[-1] > 253


def test_device_side_resize_is_torchs(maps: list[torch.Tensor]) -> None:
    levels = maps[0]
    for size in [(200, 300), (100, 100), (1000, 200)]:  # any side shrunk: anti-aliased, as before
        torch.testing.assert_close(
            resize_map(levels[None], size), _torch_reference(levels, size), rtol=0, atol=0
        )
    (p,) = resize_maps(levels[None, None], [(640, 480)])
    assert 0 <= p.min().item() <= p.max().item() <= 1


def test_mask_is_0_or_255() -> None:
    p = torch.tensor([[0.0, 0.49999, 0.5, 1.0]])
    assert to_mask(p, 0.5).tolist() == [[0, 0, 255, 255]]
    assert to_mask(p, 0.5).dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strong_reductions_on_cuda_match_the_cpu(maps: list[torch.Tensor]) -> None:
    """CUDA's anti-aliased kernel refuses 320 → 1 (not enough shared memory): such maps are
    resized on the CPU and come back to the device, equal to the CPU's."""
    levels = maps[0]
    for size in [(1, 700), (700, 1), (3, 3), (19, 4000)]:
        got = resize_map(levels[None].cuda(), size)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), _torch_reference(levels, size), rtol=0, atol=0)


@pytest.mark.parametrize("hw", [(320, 320), (321, 320), (595, 770), (2000, 3000), (4032, 3024)])
def test_finish_on_cpu_is_the_pytorch_second_half_to_the_bit(hw: tuple[int, int]) -> None:
    """OpenCV and numpy (in the codec pool) give the bytes of ``from_levels`` then
    ``to_mask``/``to_probability`` in PyTorch, for every level and thresholds on and between
    the levels."""
    gen = torch.Generator().manual_seed(hw[0] + hw[1])
    levels = torch.randint(0, 256, (320, 320), dtype=torch.uint8, generator=gen)
    levels[:16] = torch.arange(256, dtype=torch.uint8).repeat(20)[:320]  # every level
    p = torch_from_levels(levels, hw)
    for threshold in (0.0, 0.5, 1.0, 0.3, 128 / 255, 1 / 255, 254.5 / 255, 0.1 + 0.2):
        got = finish_on_cpu(levels.numpy(), hw, probability=False, threshold=threshold)
        assert np.array_equal(got, to_mask(p, threshold).numpy()), threshold
    got = finish_on_cpu(levels.numpy(), hw, probability=True, threshold=0.5)
    assert np.array_equal(got, to_probability(p).numpy())


def test_levels_are_the_device_sides_levels() -> None:
    """The 8-bit step in numpy (the CPU's) gives PyTorch's levels (a GPU's), flat maps,
    negative values and ties included."""
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(5, 1, 320, 320, generator=gen) * 7
    maps[1] = 0.25  # flat
    maps[2] = maps[2].round()  # ties
    maps[3] = torch.sigmoid(maps[3])
    assert np.array_equal(to_levels(maps.numpy()), torch_to_levels(maps).numpy())
    lo, hi = minmax(maps).amin().item(), minmax(maps).amax().item()
    assert (lo, hi) == (0.0, 1.0)


@pytest.mark.parametrize("hw", [(1, 1), (1, 2), (2, 1), (1, 3), (2, 2)])
def test_a_handful_of_pixels_gets_its_mask(hw: tuple[int, int]) -> None:
    """OpenCV reads an array of a few pixels as a scalar; the mask of a photo that small is
    numpy's (found by the OpenAPI fuzzing test: a 1×1 PNG)."""
    levels = np.full((320, 320), 200, np.uint8)
    for threshold, want in ((0.5, 255), (0.9, 0)):
        got = finish_on_cpu(levels, hw, probability=False, threshold=threshold)
        assert got.shape == hw
        assert (got == want).all()
