"""The map back to the photo's size: OpenCV's upscale on the CPU against torch's, which the parity
bounds were measured with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.postprocess import minmax, resize_map, resize_maps, to_mask, to_probability
from model.preprocess import preprocess
from model.segmenter import Segmenter

from .conftest import load_rgb, reference_dir


def _torch_reference(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The resize every map went through before: torch's, anti-aliased when shrinking."""
    out = F.interpolate(
        levels[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out[0, 0]


@pytest.fixture(scope="module")
def maps(u2netp_weights: Path) -> list[torch.Tensor]:
    """U2NETP's 8-bit 320×320 maps (as floats) of three reference photos."""
    seg = Segmenter("u2netp", u2netp_weights, device="cpu")
    out = []
    for name in ("bike.jpg", "boat.jpg", "horse.jpg"):
        with torch.inference_mode():
            raw = seg.forward(preprocess([load_rgb(reference_dir() / "images" / name)], seg.spec))
        out.append(minmax(raw).mul_(255).floor_()[0])
    return out


@pytest.mark.parametrize("size", [(2829, 4243), (4000, 3000), (320, 321), (9000, 320)])
def test_upscale_stays_within_a_handful_of_pixels(
    maps: list[torch.Tensor], size: tuple[int, int]
) -> None:
    # Measured on an AVX-512 Xeon, with OpenCV's SIMD off (its plain C), and with torch held to
    # AVX2 (ATEN_CPU_CAPABILITY=avx2): at most 2.9e-5 apart, 0-7 mask pixels of 12 M flipped,
    # 0.002-0.015% of the soft map's levels moved by one. Bounds: 3x, 7x and 7x that.
    pixels = size[0] * size[1]
    for levels in maps:
        want = _torch_reference(levels, size).div_(255)
        got = resize_map(levels, size).div_(255)
        assert got.shape == want.shape
        assert got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-4
        for threshold in (0.3, 0.5):
            flipped = (to_mask(got, threshold) != to_mask(want, threshold)).sum().item()
            assert flipped <= max(3, 50 * pixels / 12e6), (threshold, flipped)
        moved = (to_probability(got).int() - to_probability(want).int()).abs()
        assert moved.max().item() <= 1
        assert (moved > 0).sum().item() <= 1e-3 * pixels


def test_shrinking_and_other_devices_keep_torchs_resize(maps: list[torch.Tensor]) -> None:
    levels = maps[0]
    for size in [(200, 300), (100, 100), (1000, 200)]:  # any side shrunk: anti-aliased, as before
        torch.testing.assert_close(
            resize_map(levels, size), _torch_reference(levels, size), rtol=0, atol=0
        )
    (p,) = resize_maps(levels[None], [(640, 480)])
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
        got = resize_map(levels.cuda(), size)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), _torch_reference(levels, size), rtol=0, atol=0)


@pytest.mark.parametrize("hw", [(320, 320), (321, 320), (595, 770), (2000, 3000), (4032, 3024)])
def test_finish_on_cpu_is_the_pytorch_second_half_to_the_bit(hw: tuple[int, int]) -> None:
    """OpenCV and numpy (in the codec pool) give the bytes of ``from_levels`` then
    ``to_mask``/``to_probability`` in PyTorch, for every level and thresholds on and between
    the levels; a reduction is left to PyTorch."""
    import numpy as np

    from model.postprocess import finish_on_cpu, from_levels

    gen = torch.Generator().manual_seed(hw[0] + hw[1])
    levels = torch.randint(0, 256, (320, 320), dtype=torch.uint8, generator=gen)
    levels[:16] = torch.arange(256, dtype=torch.uint8).repeat(20)[:320]  # every level
    p = from_levels(levels, hw)
    for threshold in (0.0, 0.5, 1.0, 0.3, 128 / 255, 1 / 255, 254.5 / 255, 0.1 + 0.2):
        got = finish_on_cpu(levels.numpy(), hw, probability=False, threshold=threshold)
        assert np.array_equal(got, to_mask(p, threshold).numpy()), threshold
    got = finish_on_cpu(levels.numpy(), hw, probability=True, threshold=0.5)
    assert np.array_equal(got, to_probability(p).numpy())
    assert finish_on_cpu(levels.numpy(), (319, 4000), probability=False, threshold=0.5) is None


def test_levels_on_cpu_are_to_levels() -> None:
    """The 8-bit step in numpy (the service's, on the CPU) gives PyTorch's levels, flat maps,
    negative values and ties included."""
    import numpy as np

    from model.postprocess import levels_on_cpu, to_levels

    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(5, 1, 320, 320, generator=gen) * 7
    maps[1] = 0.25  # flat
    maps[2] = maps[2].round()  # ties
    maps[3] = torch.sigmoid(maps[3])
    assert np.array_equal(levels_on_cpu(maps.numpy()), to_levels(maps).numpy())
