"""The U²-Net and U²-NetP networks as data, without a framework: their stage tables and their
forward pass written once over a small set of operations.

:mod:`model.u2net` builds the PyTorch modules from these tables; :mod:`weights.convert` maps a
released ONNX graph's convolutions onto :func:`convolutions`; :mod:`model.engines.onnx_graph`
writes the fused network as an ONNX graph by running :func:`forward` with operations that emit
ONNX nodes. Nothing here needs PyTorch, so a CPU host fetches and converts weights without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

__all__ = ["STAGES", "Conv", "Ops", "Stage", "convolutions", "forward", "state_shapes"]


@dataclass(frozen=True)
class Stage:
    """One residual U-block (the authors' ``RSU4``…``RSU7``; ``dilated``: ``RSU4F``)."""

    height: int
    in_ch: int
    mid_ch: int
    out_ch: int
    dilated: bool = False


_U2NET_ENCODER = (
    Stage(7, 3, 32, 64),
    Stage(6, 64, 32, 128),
    Stage(5, 128, 64, 256),
    Stage(4, 256, 128, 512),
    Stage(4, 512, 256, 512, dilated=True),
    Stage(4, 512, 256, 512, dilated=True),
)
_U2NET_DECODER = (  # stage5d … stage1d
    Stage(4, 1024, 256, 512, dilated=True),
    Stage(4, 1024, 128, 256),
    Stage(5, 512, 64, 128),
    Stage(6, 256, 32, 64),
    Stage(7, 128, 16, 64),
)
_U2NETP_ENCODER = (
    Stage(7, 3, 16, 64),
    Stage(6, 64, 16, 64),
    Stage(5, 64, 16, 64),
    Stage(4, 64, 16, 64),
    Stage(4, 64, 16, 64, dilated=True),
    Stage(4, 64, 16, 64, dilated=True),
)
_U2NETP_DECODER = (
    Stage(4, 128, 16, 64, dilated=True),
    Stage(4, 128, 16, 64),
    Stage(5, 128, 16, 64),
    Stage(6, 128, 16, 64),
    Stage(7, 128, 16, 64),
)

# Each model's encoder stages (stage1 … stage6) and decoder stages (stage5d … stage1d).
STAGES: dict[str, tuple[tuple[Stage, ...], tuple[Stage, ...]]] = {
    "u2net": (_U2NET_ENCODER, _U2NET_DECODER),
    "u2netp": (_U2NETP_ENCODER, _U2NETP_DECODER),
}


@dataclass(frozen=True)
class Conv:
    """One convolution of the fused network (stride 1, "same" padding, with a bias)."""

    name: str  # the PyTorch module's name: "stage1.rebnconvin.conv_s1", "side1", "outconv"
    out_ch: int
    in_ch: int
    kernel: int
    dilation: int = 1

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel // 2)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_ch, self.in_ch, self.kernel, self.kernel)


T = TypeVar("T")


class Ops(Protocol[T]):
    """What the forward pass does to its values; ``scope`` is the PyTorch module that does it
    ("stage1", "stage1.rebnconvin.relu_s1"; "" for the network itself)."""

    def conv(self, x: T, conv: Conv) -> T: ...

    def relu(self, x: T, scope: str) -> T: ...

    def pool(self, x: T, scope: str) -> T:
        """2×2 max pooling, stride 2, the last row and column kept (``ceil_mode``)."""
        ...

    def upsample_like(self, x: T, like: T, scope: str) -> T:
        """Bilinear resize of ``x`` to ``like``'s height and width (``align_corners=False``)."""
        ...

    def cat(self, xs: Sequence[T], scope: str) -> T:
        """Concatenation along the channels."""
        ...

    def add(self, a: T, b: T, scope: str) -> T: ...

    def sigmoid(self, x: T, scope: str) -> T: ...


def _conv_relu(ops: Ops[T], x: T, scope: str, in_ch: int, out_ch: int, dilation: int) -> T:
    """The authors' ``REBNCONV`` with its batch norm folded: 3×3 dilated convolution, ReLU."""
    x = ops.conv(x, Conv(f"{scope}.conv_s1", out_ch, in_ch, 3, dilation))
    return ops.relu(x, f"{scope}.relu_s1")


def _rsu(ops: Ops[T], x: T, scope: str, stage: Stage) -> T:
    """The residual U-block, as ``model.u2net._RSU.forward`` runs it."""
    height, mid, out = stage.height, stage.mid_ch, stage.out_ch
    enc = [2**i if stage.dilated else 1 for i in range(height - 1)]
    bottom = 2 ** (height - 1) if stage.dilated else 2
    hxin = _conv_relu(ops, x, f"{scope}.rebnconvin", stage.in_ch, out, 1)
    skips: list[T] = []
    hx = hxin
    for i in range(1, height):
        if i > 1 and not stage.dilated:
            hx = ops.pool(hx, scope)
        hx = _conv_relu(ops, hx, f"{scope}.rebnconv{i}", out if i == 1 else mid, mid, enc[i - 1])
        skips.append(hx)
    hx = _conv_relu(ops, hx, f"{scope}.rebnconv{height}", mid, mid, bottom)
    for i in range(height - 1, 0, -1):
        cat = ops.cat([hx, skips[i - 1]], scope)
        hx = _conv_relu(
            ops, cat, f"{scope}.rebnconv{i}d", mid * 2, out if i == 1 else mid, enc[i - 1]
        )
        if i > 1 and not stage.dilated:
            hx = ops.upsample_like(hx, skips[i - 2], scope)
    return ops.add(hx, hxin, scope)


def forward(ops: Ops[T], model: str, x: T) -> T:
    """The fused network's forward pass (``model.u2net.U2Net.forward``): the fused map after
    the sigmoid."""
    encoder, decoder = STAGES[model]
    depth = len(encoder)
    skips: list[T] = []
    hx = x
    for i, stage in enumerate(encoder, start=1):
        if i > 1:
            hx = ops.pool(hx, "")
        hx = _rsu(ops, hx, f"stage{i}", stage)
        skips.append(hx)
    decoded = [hx]  # the inputs of side 1 … 6: hx1d … hx5d, then the bottom stage's hx6
    for i, stage in zip(range(depth - 1, 0, -1), decoder, strict=True):
        hx = ops.upsample_like(hx, skips[i - 1], "")
        hx = _rsu(ops, ops.cat([hx, skips[i - 1]], ""), f"stage{i}d", stage)
        decoded.insert(0, hx)
    side_in = [s.out_ch for s in reversed(decoder)] + [encoder[-1].out_ch]
    sides = [
        ops.conv(h, Conv(f"side{i}", 1, ch, 3))
        for i, (h, ch) in enumerate(zip(decoded, side_in, strict=True), start=1)
    ]
    sides = [sides[0]] + [ops.upsample_like(s, sides[0], "") for s in sides[1:]]
    fused = ops.conv(ops.cat(sides, ""), Conv("outconv", 1, depth, 1))
    return ops.sigmoid(fused, "")


class _Recorder:
    """Operations on nothing that note each convolution as it is called."""

    def __init__(self) -> None:
        self.convs: list[Conv] = []

    def conv(self, x: None, conv: Conv) -> None:
        self.convs.append(conv)

    def relu(self, x: None, scope: str) -> None:
        return None

    def pool(self, x: None, scope: str) -> None:
        return None

    def upsample_like(self, x: None, like: None, scope: str) -> None:
        return None

    def cat(self, xs: Sequence[None], scope: str) -> None:
        return None

    def add(self, a: None, b: None, scope: str) -> None:
        return None

    def sigmoid(self, x: None, scope: str) -> None:
        return None


def convolutions(model: str) -> list[Conv]:
    """Every convolution of ``model`` in the order its forward pass calls them."""
    recorder = _Recorder()
    forward(recorder, model, None)
    return recorder.convs


def state_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """The fused state dict's names and shapes: each convolution's weight and bias."""
    shapes: dict[str, tuple[int, ...]] = {}
    for conv in convolutions(model):
        shapes[f"{conv.name}.weight"] = conv.weight_shape
        shapes[f"{conv.name}.bias"] = (conv.out_ch,)
    return shapes
