"""Half precision on the CPU, to judge a GPU dtype without a GPU.

On CUDA with ``float16`` (or ``bfloat16``) the network's body stores every weight and every
activation in 16 bits while its convolutions accumulate in float32; the one-channel head
(``outconv``) stays in float32, as :class:`model.u2net.U2Net` keeps it. Rounding each
convolution's weights, input and output to the 16-bit type, with float32 arithmetic in between,
reproduces that storage rounding: every other body operation (ReLU, max-pooling, concatenation)
is exact on 16-bit values, and the results of bilinear upsampling and of the residual additions
are rounded where the next convolution reads them.

    python -m bench.parity --emulate float16          # the authors' maps, emulated float16
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from model.u2net import U2Net

__all__ = ["emulated"]


@contextmanager
def emulated(net: U2Net, dtype: torch.dtype) -> Iterator[U2Net]:
    """``net`` (float32) with the body's storage rounded to ``dtype`` until the block exits."""

    def rounded(t: Tensor) -> Tensor:
        return t.to(dtype).float()

    convs = [m for name, m in net.named_modules() if isinstance(m, nn.Conv2d) and name != "outconv"]
    saved = [(m.weight.data, None if m.bias is None else m.bias.data) for m in convs]
    hooks = []
    for m in convs:
        m.weight.data = rounded(m.weight.data)
        if m.bias is not None:
            m.bias.data = rounded(m.bias.data)
        hooks.append(m.register_forward_pre_hook(lambda _, args: tuple(rounded(a) for a in args)))
        hooks.append(m.register_forward_hook(lambda _, __, out: rounded(out)))
    try:
        yield net
    finally:
        for h in hooks:
            h.remove()
        for m, (w, b) in zip(convs, saved, strict=True):
            m.weight.data = w
            if m.bias is not None and b is not None:
                m.bias.data = b
