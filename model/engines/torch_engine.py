"""PyTorch: every device and dtype; the engine on GPUs (cuDNN, float16, large batches)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from model.engines import EngineName, EngineOptions
from model.u2net import U2Net, u2net, u2netp

__all__ = ["TorchEngine", "load", "prepare"]


class TorchEngine:
    name: EngineName = "torch"
    artifact_digest = None  # it runs the verified weights file itself

    def __init__(self, net: U2Net, options: EngineOptions) -> None:
        self.device = options.device
        self.dtype = options.dtype
        self.arithmetic = str(self.dtype).removeprefix("torch.")
        self.allocates_per_call = self.device.type == "cpu"
        self.memory_format = (
            torch.channels_last if options.channels_last else torch.contiguous_format
        )
        self.net = net.to(self.device, self.dtype).to(memory_format=self.memory_format)  # type: ignore[call-overload]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if self.dtype == torch.float32:
                # TF32 keeps 10 mantissa bits, as float16 does: float32 is chosen where that
                # rounding misses the parity bounds (U2NETP), so it must be real float32.
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        if options.threads and self.device.type == "cpu":
            torch.set_num_threads(options.threads)

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.device, dtype=self.dtype, memory_format=self.memory_format)
        return self.net(x).float()


def prepare(weights: Path, model: str) -> list[Path]:
    """PyTorch reads the verified weights file itself."""
    return []


def load(weights: Path, model: str, options: EngineOptions) -> TorchEngine:
    builder = u2net if model == "u2net" else u2netp
    return TorchEngine(builder(weights=weights), options)
