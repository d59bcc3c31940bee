"""U²-Net and U²-NetP (Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient
Object Detection", Pattern Recognition 2020).

Module attribute names follow the authors' reference code (``stageN``, ``rebnconvN``,
``conv_s1``/``bn_s1``, ``sideN``, ``outconv``) so their released checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture import STAGES, Stage

__all__ = ["U2Net", "fuse_batchnorm", "u2net", "u2netp"]


def _upsample_like(x: Tensor, like: Tensor) -> Tensor:
    # The authors used F.upsample(mode="bilinear"), i.e. align_corners=False.
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def _pool(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class _ConvBNReLU(nn.Module):
    """The authors' ``REBNCONV``: 3×3 dilated convolution, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1: nn.Module = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class _RSU(nn.Module):
    """Residual U-block of the given height (the authors' ``RSU4``…``RSU7``).

    ``dilated=True`` gives ``RSU4F``: no pooling, growing dilation instead, for the low-resolution
    stages where further downsampling would lose the context.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int, *, dilated: bool = False):
        super().__init__()
        self.height = height
        self.dilated = dilated
        # Encoder dilations 1..height-1, then the bottom layer; RSU4F doubles at every level.
        enc = [2**i if dilated else 1 for i in range(height - 1)]
        bottom = 2 ** (height - 1) if dilated else 2
        self.rebnconvin = _ConvBNReLU(in_ch, out_ch)
        for i, d in enumerate(enc, start=1):
            self.add_module(f"rebnconv{i}", _ConvBNReLU(out_ch if i == 1 else mid_ch, mid_ch, d))
        self.add_module(f"rebnconv{height}", _ConvBNReLU(mid_ch, mid_ch, bottom))
        for i in range(height - 1, 0, -1):
            self.add_module(
                f"rebnconv{i}d", _ConvBNReLU(mid_ch * 2, out_ch if i == 1 else mid_ch, enc[i - 1])
            )

    def forward(self, x: Tensor) -> Tensor:
        hxin = self.rebnconvin(x)
        skips: list[Tensor] = []
        hx = hxin
        for i in range(1, self.height):
            if i > 1 and not self.dilated:
                hx = _pool(hx)
            hx = getattr(self, f"rebnconv{i}")(hx)
            skips.append(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)
        for i in range(self.height - 1, 0, -1):
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, skips[i - 1]), 1))
            if i > 1 and not self.dilated:
                hx = _upsample_like(hx, skips[i - 2])
        return hx + hxin


def _rsu(stage: Stage) -> _RSU:
    return _RSU(stage.height, stage.in_ch, stage.mid_ch, stage.out_ch, dilated=stage.dilated)


class U2Net(nn.Module):
    """Two-level nested U-structure: six encoder stages, five decoder stages, six side outputs
    fused by a 1×1 convolution.

    ``forward`` returns the fused saliency map (after the sigmoid), shape ``(N, 1, H, W)``; the
    authors' seven maps are available from ``forward_side_outputs`` for training or inspection.
    """

    def __init__(self, encoder: Sequence[Stage], decoder: Sequence[Stage], out_ch: int = 1):
        super().__init__()
        if len(encoder) != len(decoder) + 1:
            raise ValueError("U2Net needs exactly one more encoder stage than decoder stages")
        self.depth = len(encoder)
        for i, stage in enumerate(encoder, start=1):
            self.add_module(f"stage{i}", _rsu(stage))
        for i, stage in zip(range(self.depth - 1, 0, -1), decoder, strict=True):
            self.add_module(f"stage{i}d", _rsu(stage))
        side_in = [s.out_ch for s in reversed(decoder)] + [encoder[-1].out_ch]
        for i, ch in enumerate(side_in, start=1):
            self.add_module(f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(self.depth * out_ch, out_ch, 1)

    def _side_logits(self, x: Tensor) -> list[Tensor]:
        skips: list[Tensor] = []
        hx = x
        for i in range(1, self.depth + 1):
            if i > 1:
                hx = _pool(hx)
            hx = getattr(self, f"stage{i}")(hx)
            skips.append(hx)
        # decoded[k] is the input of side k+1: hx1d … hx5d, then the bottom stage hx6.
        decoded = [hx]
        for i in range(self.depth - 1, 0, -1):
            hx = _upsample_like(hx, skips[i - 1])
            hx = getattr(self, f"stage{i}d")(torch.cat((hx, skips[i - 1]), 1))
            decoded.insert(0, hx)
        # The head runs in float32 whatever the body's dtype: the one-channel maps are cheap,
        # and half-precision rounding here would show in the final map after min–max scaling.
        sides = [getattr(self, f"side{i}")(h).float() for i, h in enumerate(decoded, start=1)]
        return [sides[0]] + [_upsample_like(s, sides[0]) for s in sides[1:]]

    def _fuse(self, sides: list[Tensor]) -> Tensor:
        x = torch.cat(sides, 1)
        w, b = self.outconv.weight, self.outconv.bias
        if w.dtype == x.dtype:
            return self.outconv(x)  # through the module, so hooks see it (weights/convert.py)
        return F.conv2d(x, w.float(), None if b is None else b.float())

    def forward(self, x: Tensor) -> Tensor:
        """The fused saliency map in [0, 1], float32, ``N×1×H×W``."""
        return torch.sigmoid(self._fuse(self._side_logits(x)))

    def forward_side_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """The authors' seven outputs: the fused map, then side maps 1…6, all after the sigmoid."""
        sides = self._side_logits(x)
        return tuple(torch.sigmoid(t) for t in (self._fuse(sides), *sides))


def fuse_batchnorm(model: U2Net) -> U2Net:
    """Fold every batch norm into its convolution, in place; the model must be in eval mode.

    The fused model has no ``bn_s1`` parameters: its state dict is the layout of the released
    ONNX graphs and of the ``.safetensors`` files this project writes.
    """
    if model.training:
        raise RuntimeError("fuse_batchnorm needs a model in eval mode")
    for block in model.modules():
        if isinstance(block, _ConvBNReLU) and isinstance(block.bn_s1, nn.BatchNorm2d):
            block.conv_s1 = nn.utils.fusion.fuse_conv_bn_eval(block.conv_s1, block.bn_s1)
            block.bn_s1 = nn.Identity()
    return model


def _build(name: str, weights: str | Path | None, fused: bool) -> U2Net:
    model = U2Net(*STAGES[name]).eval()
    if weights is not None or fused:
        fuse_batchnorm(model)
    if weights is not None:
        from model.weights import load_state_dict

        state = {k: torch.from_numpy(v) for k, v in load_state_dict(weights, name).items()}
        model.load_state_dict(state, strict=True)
    return model


def u2net(*, weights: str | Path | None = None, fused: bool = False) -> U2Net:
    """U²-Net (full, 44M parameters). With ``weights``, a verified fused ``.safetensors`` file is
    loaded strictly and the model comes back fused and in eval mode."""
    return _build("u2net", weights, fused)


def u2netp(*, weights: str | Path | None = None, fused: bool = False) -> U2Net:
    """U²-NetP (small, 1.1M parameters); see :func:`u2net`."""
    return _build("u2netp", weights, fused)
