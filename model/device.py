"""Where the network runs and in which arithmetic, named without PyTorch.

A CPU host runs MNN or OpenVINO and never imports PyTorch (it may not even have it: the default
install is the CPU set, and PyTorch comes with the ``gpu`` extra). So a device is a small value
of its own, spelt as PyTorch spells it (``cpu``, ``cuda``, ``cuda:1``), and a dtype is its name
(``float32``, ``float16``, ``bfloat16``, ``int8``); only the torch engine and the device-side
stages (:mod:`model.torch_stages`) turn them into PyTorch's. ``auto`` looks for the NVIDIA
driver before it imports PyTorch to ask for a CUDA device, so a host without a GPU never loads
it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["CPU", "DTYPES", "Device", "cuda_available", "gpu_extra_hint", "resolve_device"]

# The dtypes an engine's body can be asked to compute in; int8 is what a quantized model reports.
DTYPES = ("float32", "float16", "bfloat16")

# The NVIDIA driver's files: without them no CUDA device can be there, and PyTorch is not asked.
_DRIVER = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


@dataclass(frozen=True)
class Device:
    """A device as PyTorch names it: its type and, for a GPU, perhaps its index."""

    type: Literal["cpu", "cuda"]
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @classmethod
    def parse(cls, name: str) -> Device:
        """``cpu``, ``cuda`` or ``cuda:N``; :class:`ValueError` for anything else."""
        kind, _, index = name.strip().partition(":")
        if kind == "cpu" and not index:
            return CPU
        if kind == "cuda" and (not index or index.isdigit()):
            return cls("cuda", int(index) if index else None)
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")


CPU = Device("cpu")


def gpu_extra_hint() -> str:
    return "PyTorch runs the network on a GPU: install it with pip install 'u2serve[gpu]'"


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def cuda_available() -> bool:
    """Whether a CUDA device can run the network: the NVIDIA driver is there, PyTorch is
    installed, and it finds a device. PyTorch is imported only when the first two hold."""
    if not any(path.exists() for path in _DRIVER) or not _torch_installed():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> Device:
    """``auto`` is the first CUDA device when there is one (:func:`cuda_available`), else the
    CPU; a CUDA device asked for by name must be there."""
    if device == "auto":
        return Device("cuda") if cuda_available() else CPU
    resolved = Device.parse(device)
    if resolved.type == "cuda" and not cuda_available():
        why = "" if _torch_installed() else f" ({gpu_extra_hint()})"
        raise RuntimeError(f"device {device!r} asked for, but no CUDA device is available{why}")
    return resolved
