"""The network's input, made in numpy, against plain PyTorch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.preprocess import normalise, preprocess
from model.torch_stages import minmax, to_mask, to_probability
from model.weights import SPECS

SPEC = SPECS["u2netp"]


@pytest.mark.parametrize("hw", [(320, 320), (173, 290), (2000, 3000), (1, 1), (5, 999)])
def test_gathered_resize_equals_interpolate(hw: tuple[int, int]) -> None:
    image = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8)
    ours = preprocess([image.numpy()], SPEC)
    ref = F.interpolate(
        image.permute(2, 0, 1)[None].float(),
        size=(320, 320),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    )
    want = normalise(ref.numpy(), SPEC)
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_normalise_divides_by_each_images_maximum() -> None:
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    x[1] *= 0.25
    out = normalise(x, SPEC)
    mean = np.asarray(SPEC.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(SPEC.std, np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(out[1], (x[1] / x[1].max() - mean) / std, rtol=1e-6)


def test_black_image_does_not_divide_by_zero() -> None:
    out = preprocess([np.zeros((10, 10, 3), np.uint8)], SPEC)
    assert np.isfinite(out).all()


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8 H×W×3"):
        preprocess([np.zeros((10, 10, 4), np.uint8)], SPEC)


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


def _torch_normalise(x: torch.Tensor) -> torch.Tensor:
    """The normalisation as PyTorch ran it, each operation rounded as it rounds."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp_(min=1e-6)
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return (x / peak - mean) / std


def _torch_blend(image: torch.Tensor, size: int) -> torch.Tensor:
    """The blend the service ran in PyTorch before ``prepare`` ran it in numpy, operation by
    operation: the input the network saw then, on the CPU and on CUDA alike."""
    from model.preprocess import resize_weights

    y0, y1, wy = (torch.from_numpy(t) for t in resize_weights(image.shape[0], size))
    x0, x1, wx = (torch.from_numpy(t) for t in resize_weights(image.shape[1], size))
    p = image.index_select(0, torch.cat((y0, y1))).index_select(1, torch.cat((x0, x1))).float()
    wy, wx = wy.view(size, 1, 1), wx.view(1, size, 1)
    top = p[:size, :size] * (1 - wx) + p[:size, size:] * wx
    bottom = p[size:, :size] * (1 - wx) + p[size:, size:] * wx
    return (top * (1 - wy) + bottom * wy).permute(2, 0, 1)


@pytest.mark.parametrize(
    "hw",
    [
        *[(320, 320), (173, 290), (2000, 3000), (1, 1), (5, 999), (321, 319), (4032, 3024)],
        # OpenCV's remap gathers the pixels up to 32766 a side, numpy's take beyond it.
        *[(3, 32766), (32766, 2), (2, 32767), (40000, 3)],
    ],
)
def test_prepare_is_the_pytorch_blend_to_the_bit(hw: tuple[int, int]) -> None:
    """``prepare`` (numpy, in the codec pool) gives the very input the PyTorch blend gave, so
    the maps and the answers are the same bytes as before it moved."""
    import numpy as np

    from model.preprocess import prepare

    gen = torch.Generator().manual_seed(hw[0] * 7919 + hw[1])
    image = torch.randint(0, 256, (*hw, 3), dtype=torch.uint8, generator=gen)
    expected = _torch_normalise(_torch_blend(image, SPEC.input_size)[None])[0]
    assert np.array_equal(prepare(image.numpy(), SPEC), expected.numpy())
    # A view (a photo turned upright by its EXIF tag, a crop) is read where it lies.
    view = image.numpy()[::-1, ::-1]
    flipped = _torch_normalise(_torch_blend(image.flip(0, 1), SPEC.input_size)[None])[0]
    assert np.array_equal(prepare(view, SPEC), flipped.numpy())
