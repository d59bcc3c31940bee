"""Images (uint8 ``H×W×3`` tensors) to the network's normalised ``N×3×S×S`` input.

The authors' steps: bilinear resize to S×S without anti-aliasing, divide by the image maximum,
ImageNet normalisation. Downscaling without anti-aliasing reads at most two source rows and two
source columns per output pixel, so we gather only those (≤ 2S rows, ≤ 2S columns) from the uint8
image and blend them in float: the cost does not grow with the photo, and only a small patch ever
needs to travel to an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.weights import WeightsSpec

__all__ = ["normalise", "preprocess", "resize_weights"]


def resize_weights(src: int, dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices ``i0``, ``i1`` and weights of ``i1`` for a bilinear resize of one axis,
    the same arithmetic as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    # float32 throughout, like PyTorch's kernel, so the weights agree to the last bit.
    scale = torch.tensor(src / dst, dtype=torch.float32)
    pos = ((torch.arange(dst, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = pos.long().clamp_(max=src - 1)
    i1 = (i0 + 1).clamp_(max=src - 1)
    return i0, i1, pos - i0


def _resize_one(image: Tensor, size: int, device: torch.device) -> Tensor:
    """One uint8 ``H×W×3`` image → ``3×S×S`` float32 on ``device``.

    Only the ``2S×2S`` patch the resize reads is gathered (rows ``[:S]`` are the upper
    neighbours, ``[S:]`` the lower ones; the same for columns) and sent to ``device``.
    """
    y0, y1, wy = resize_weights(image.shape[0], size)
    x0, x1, wx = resize_weights(image.shape[1], size)
    patch = image.index_select(0, torch.cat((y0, y1))).index_select(1, torch.cat((x0, x1)))
    if device.type == "cuda":
        patch = patch.pin_memory().to(device, non_blocking=True)
    p = patch.to(device).float()
    wy = wy.to(device).view(size, 1, 1)
    wx = wx.to(device).view(1, size, 1)
    top = p[:size, :size] * (1 - wx) + p[:size, size:] * wx
    bottom = p[size:, :size] * (1 - wx) + p[size:, size:] * wx
    return (top * (1 - wy) + bottom * wy).permute(2, 0, 1)


def normalise(x: Tensor, spec: WeightsSpec) -> Tensor:
    """Divide each image by its own maximum, then the ImageNet mean and std (``N×3×S×S``)."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp_(min=1e-6)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x / peak - mean) / std


def preprocess(
    images: Sequence[Tensor], spec: WeightsSpec, device: torch.device | str = "cpu"
) -> Tensor:
    """Resize and normalise a batch of uint8 ``H×W×3`` images of any sizes → ``N×3×S×S`` float32."""
    size = spec.input_size
    device = torch.device(device)
    planes = []
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 H×W×3 tensor, got {image.dtype} {tuple(image.shape)}"
            )
        planes.append(_resize_one(image, size, device))
    return normalise(torch.stack(planes), spec)
