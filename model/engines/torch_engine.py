"""PyTorch: every device and dtype; the engine on GPUs (cuDNN, float16, large batches). It comes
with the ``gpu`` extra; a CPU host runs MNN or OpenVINO and never imports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.engines import EngineName, EngineOptions
from model.u2net import U2Net, u2net, u2netp

__all__ = ["TorchEngine", "load", "prepare", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """A dtype's name (:data:`model.device.DTYPES`) as PyTorch's dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a PyTorch dtype: {name!r}")
    return dtype


class TorchEngine:
    name: EngineName = "torch"
    artifact_digest = None  # it runs the verified weights file itself
    ready_at_load = False  # cuDNN's search, the allocators: the first calls pay for them

    def __init__(self, net: U2Net, options: EngineOptions) -> None:
        self.device = options.device
        self.dtype = options.dtype
        self.arithmetic = self.dtype
        self.allocates_per_call = self.device.type == "cpu"
        self.torch_device = torch.device(str(self.device))
        self._dtype = torch_dtype(self.dtype)
        self.memory_format = (
            torch.channels_last if options.channels_last else torch.contiguous_format
        )
        self.net = net.to(self.torch_device, self._dtype).to(memory_format=self.memory_format)  # type: ignore[call-overload]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if self._dtype == torch.float32:
                # TF32 keeps 10 mantissa bits, as float16 does: float32 is chosen where that
                # rounding misses the parity bounds (U2NETP), so it must be real float32.
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        if options.threads and self.device.type == "cpu":
            torch.set_num_threads(options.threads)

    @torch.inference_mode()
    def run(self, x: Tensor) -> Tensor:
        """A normalised batch as a tensor (anywhere) → the fused maps, float32 on the device."""
        x = x.to(self.torch_device, dtype=self._dtype, memory_format=self.memory_format)
        return self.net(x).float()

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.run(torch.from_numpy(np.ascontiguousarray(x))).cpu().numpy()


def prepare(weights: Path, model: str) -> list[Path]:
    """PyTorch reads the verified weights file itself."""
    return []


def load(weights: Path, model: str, options: EngineOptions) -> TorchEngine:
    builder = u2net if model == "u2net" else u2netp
    return TorchEngine(builder(weights=weights), options)
