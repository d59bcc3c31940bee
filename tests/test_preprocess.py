"""The tensor pipeline's pieces against plain PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.postprocess import minmax, to_mask, to_probability
from model.preprocess import normalise, preprocess
from model.weights import SPECS

SPEC = SPECS["u2netp"]


@pytest.mark.parametrize("hw", [(320, 320), (173, 290), (2000, 3000), (1, 1), (5, 999)])
def test_gathered_resize_equals_interpolate(hw: tuple[int, int]) -> None:
    image = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8)
    ours = preprocess([image], SPEC)
    ref = F.interpolate(
        image.permute(2, 0, 1)[None].float(),
        size=(320, 320),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    torch.testing.assert_close(ours, normalise(ref, SPEC), atol=1e-4, rtol=0)


def test_normalise_divides_by_each_images_maximum() -> None:
    x = torch.rand(2, 3, 8, 8)
    x[1] *= 0.25
    out = normalise(x, SPEC)
    mean = torch.tensor(SPEC.mean).view(3, 1, 1)
    std = torch.tensor(SPEC.std).view(3, 1, 1)
    torch.testing.assert_close(out[1], (x[1] / x[1].max() - mean) / std)


def test_black_image_does_not_divide_by_zero() -> None:
    out = preprocess([torch.zeros(10, 10, 3, dtype=torch.uint8)], SPEC)
    assert torch.isfinite(out).all()


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8 H×W×3"):
        preprocess([torch.zeros(10, 10, 4, dtype=torch.uint8)], SPEC)


def test_minmax_per_image_and_flat_maps() -> None:
    maps = torch.stack([torch.linspace(0.2, 0.6, 16).view(1, 4, 4), torch.full((1, 4, 4), 0.3)])
    out = minmax(maps)
    assert out[0].min() == 0
    assert out[0].max() == 1
    assert (out[1] == 0).all()


def test_mask_and_probability_levels() -> None:
    p = torch.tensor([0.0, 0.499, 0.5, 0.71, 1.0])
    assert to_mask(p, 0.5).tolist() == [0, 0, 255, 255, 255]
    assert to_probability(p).tolist() == [0, 127, 128, 181, 255]
