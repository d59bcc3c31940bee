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

__all__ = ["gather_patch", "normalise", "preprocess", "resize_weights"]


def resize_weights(src: int, dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices ``i0``, ``i1`` and weights of ``i1`` for a bilinear resize of one axis,
    the same arithmetic as ``F.interpolate(mode="bilinear", align_corners=False)``."""
    # float32 throughout, like PyTorch's kernel, so the weights agree to the last bit.
    scale = torch.tensor(src / dst, dtype=torch.float32)
    pos = ((torch.arange(dst, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = pos.long().clamp_(max=src - 1)
    i1 = (i0 + 1).clamp_(max=src - 1)
    return i0, i1, pos - i0


def gather_patch(image: Tensor, size: int) -> Tensor:
    """The ``2S×2S×3`` uint8 patch of ``image`` that a resize to ``S×S`` reads.

    Rows ``[:S]`` are the upper neighbours and ``[S:]`` the lower ones; the same for columns.
    """
    h, w = image.shape[:2]
    y0, y1, _ = resize_weights(h, size)
    x0, x1, _ = resize_weights(w, size)
    rows = image.index_select(0, torch.cat((y0, y1)))
    return rows.index_select(1, torch.cat((x0, x1)))


def _blend(patch: Tensor, hw: tuple[int, int], size: int) -> Tensor:
    """Bilinear blend of a gathered patch → ``3×S×S`` float32 on the patch's device."""
    _, _, wy = resize_weights(hw[0], size)
    _, _, wx = resize_weights(hw[1], size)
    wy = wy.to(patch.device).view(size, 1, 1)
    wx = wx.to(patch.device).view(1, size, 1)
    p = patch.float()
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
    pin = device.type == "cuda"
    planes = []
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 H×W×3 tensor, got {image.dtype} {tuple(image.shape)}"
            )
        patch = gather_patch(image, size)
        if pin:
            patch = patch.pin_memory()
        planes.append(
            _blend(patch.to(device, non_blocking=pin), (image.shape[0], image.shape[1]), size)
        )
    return normalise(torch.stack(planes), spec)
