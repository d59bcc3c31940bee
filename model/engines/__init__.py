"""Ways to run the network: one small interface, one module per engine, ``auto`` resolved once.

An engine takes the normalised ``N×3×S×S`` float32 batch that :mod:`model.preprocess` makes (a
numpy array) and returns the fused map, ``N×1×S×S`` float32 in [0, 1] (a numpy array).
Everything before and after (resizing, normalisation, the authors' 8-bit step, thresholds) stays
in :class:`model.segmenter.Segmenter`, so every engine is held to the same pipeline and the same
parity tests. Engine libraries are imported only when their engine is used: a CPU host never
imports PyTorch.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, Protocol, cast

import numpy as np

from model import verified
from model.device import Device

__all__ = [
    "DEFAULT_PRECISION",
    "DERIVED",
    "ENGINES",
    "MIXED_MODELS",
    "PRECISIONS",
    "Arithmetic",
    "Engine",
    "EngineModule",
    "EngineName",
    "EngineOptions",
    "Precision",
    "cpu_arithmetic",
    "cpu_features",
    "engine_module",
    "file_sha256",
    "float32_cpu_engine",
    "int8_pays",
    "load_engine",
    "prepare_engines",
    "prepare_hint",
    "resolve_engine",
]

# "cascade" is two of the others, int8 then float32 (model.cascade), never chosen by name.
EngineName = Literal["torch", "mnn", "openvino", "cascade"]
ENGINES: tuple[EngineName, ...] = ("torch", "mnn", "openvino")

Precision = Literal["faithful", "fast", "float32", "auto"]
# ``auto``: on the CPU, int8 for every photo and float32 again for the photos whose int8 map is
# uncertain (model.cascade); elsewhere as ``faithful``.
PRECISIONS: tuple[Precision, ...] = ("faithful", "fast", "float32", "auto")
# The rule: int8 (``fast``) would be the CPU default only if it met the faithful parity bounds
# on both models (mean MAE ≤ 0.001, worst ≤ 0.003, mean IoU@0.5 ≥ 0.995, worst ≥ 0.99 against
# the authors' maps). It does not (README, Faithfulness; tests/test_parity.py holds the choice),
# so it is one setting away. ``faithful`` is the fastest arithmetic held to those bounds on this
# CPU (:func:`cpu_arithmetic`); ``float32`` is float32 everywhere, whatever the CPU.
DEFAULT_PRECISION: Precision = "faithful"

# What runs on the CPU: float32; int8 (with the head in float32: ``fast``); or the mixed model,
# int8 with the layers int8 moves the maps most kept in float32, held to the faithful bounds.
Arithmetic = Literal["float32", "int8", "mixed"]
# The models whose mixed model meets the faithful bounds on the authors' photos and against
# float32 on unseen ones (tests/test_parity.py holds it there); its layers are
# ``model.engines.openvino_files.KEEP_MIXED``'s. None yet: measured (bench/README.md, "Mixed
# precision"), U2NET's worst photo stayed under IoU 0.99 with 56% of the work back in float32,
# where int8's speed was gone, and U2NETP was far outside the bounds with 35%.
MIXED_MODELS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EngineOptions:
    """How to run: the device, the body's dtype, the layout, CPU threads (None: the engine's
    own default), and the precision asked for (an engine that has an int8 model runs it for
    ``fast``, and its mixed model for ``faithful`` where :func:`cpu_arithmetic` says so)."""

    device: Device
    dtype: str = "float32"
    channels_last: bool = True
    threads: int | None = None
    precision: Precision = DEFAULT_PRECISION


class Engine(Protocol):
    """A loaded network."""

    name: EngineName
    device: Device  # where the network runs
    dtype: str  # the arithmetic of the network's body: float32, float16, bfloat16, int8
    # Whether forward takes its working memory from the process's C heap on every call (PyTorch
    # on the CPU), rather than once at load (MNN's pools) or on a GPU: the service tunes the
    # allocator for its image buffers only where the engine does not.
    allocates_per_call: bool
    # Whether its first call costs what later ones do: everything prepared at load (MNN's
    # session, OpenVINO's compiled model: measured 5-15% more for U2NET's first call, the page
    # faults of its buffers). The service warms up only the engines that are not (PyTorch:
    # cuDNN's algorithm search, the CUDA allocator), and is ready that much sooner (0.5 s of
    # U2NET on 2 cores).
    ready_at_load: bool
    # The arithmetic that runs, for people: "float32", "int8+float32 (12 layers)".
    arithmetic: str
    # The SHA-256 of the engine's own model file, derived from the weights (converted or
    # quantised); None when it runs the verified weights themselves. Maps are cached under it.
    artifact_digest: str | None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalised ``N×3×S×S`` float32 → fused map ``N×1×S×S`` float32, both on the CPU."""
        ...


class EngineModule(Protocol):
    """What each engine module provides."""

    def prepare(self, weights: Path, model: str) -> list[Path]:
        """Derive the engine's own model files from verified weights, if it needs any, and
        return their paths (none if the engine reads the weights file itself)."""
        ...

    def load(self, weights: Path, model: str, options: EngineOptions) -> Engine:
        """Load the engine for verified weights; refuse a missing or damaged derived file."""
        ...


def engine_module(name: str) -> EngineModule:
    if name not in ENGINES:
        raise ValueError(f"engine must be auto or one of {', '.join(ENGINES)}, not {name!r}")
    return cast(EngineModule, importlib.import_module(f"model.engines.{name}_engine"))


def resolve_engine(
    name: str,
    device: Device,
    dtype: str,
    precision: str = DEFAULT_PRECISION,
    model: str | None = None,
) -> EngineName:
    """``auto``: PyTorch on a GPU (cuDNN, float16, batches); on the CPU, OpenVINO where the
    arithmetic for this precision, model and CPU is int8 or mixed (:func:`cpu_arithmetic`),
    otherwise the fastest float32 engine for this CPU (:func:`float32_cpu_engine`). int8 is
    OpenVINO's alone: for U2NET 6.8× ONNX Runtime's float32 with AMX, 3.5× with AVX-512 VNNI,
    1.25× with AVX2 alone, which bfloat16 (2× at best, and outside the faithful bounds) does not
    approach. Any other CPU dtype stays with PyTorch.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if name != "auto":
        engine_module(name)  # validates the name
        return cast(EngineName, name)
    if device.type == "cpu" and dtype == "float32":
        vendor, flags = cpu_features()
        if cpu_arithmetic(model, cast(Precision, precision), flags) != "float32":
            return "openvino"
        return float32_cpu_engine(vendor, flags)
    return "torch"


def int8_pays(flags: frozenset[str]) -> bool:
    """Whether int8 is worth it on a CPU: where it has int8 dot products in AVX-512 (VNNI) or
    AMX tiles. Measured for U2NET at batch 1 on two threads (bench/README.md): int8 6.8× ONNX
    Runtime's float32 with AMX, 3.5× held to AVX-512 VNNI, 1.25× held to AVX2 alone, where the
    mixed model's float32 layers leave nothing of that. AVX-VNNI (256-bit, on client CPUs) is
    not measured, so it counts as AVX2."""
    return "amx_int8" in flags or "avx512_vnni" in flags


def cpu_arithmetic(model: str | None, precision: Precision, flags: frozenset[str]) -> Arithmetic:
    """What runs on a CPU with these feature flags: ``fast`` is int8; ``float32`` is float32;
    ``faithful`` is the mixed model for a model that has one (:data:`MIXED_MODELS`) on a CPU
    where int8 pays (:func:`int8_pays`), float32 otherwise."""
    if precision == "fast":
        return "int8"
    if precision == "faithful" and model in MIXED_MODELS and int8_pays(flags):
        return "mixed"
    return "float32"


def float32_cpu_engine(vendor: str, flags: frozenset[str]) -> EngineName:
    """The faster float32 engine for a CPU: OpenVINO (oneDNN's direct convolutions, written
    for Intel's cores) on an Intel CPU with AVX-512, MNN (Winograd 3×3 convolutions, 94% of
    U²-Net's FLOPs) everywhere else. Measured for U2NET at batch 1 on two threads
    (bench/README.md): on an Intel Xeon with AVX-512 (and AMX, which float32 does not use)
    OpenVINO took 388-453 ms, ONNX Runtime 412-462 and MNN 456-506 over three alternating runs;
    on an AMD EPYC with AVX-512 (Zen 4) MNN took 297 ms, ONNX Runtime 319-322 and OpenVINO 318,
    and with AVX2 alone (Zen 3) MNN was 1.68× ONNX Runtime. Both give the authors' maps within
    the faithful bounds (tests/test_parity.py)."""
    return "openvino" if vendor == "GenuineIntel" and "avx512f" in flags else "mnn"


@cache
def cpu_features() -> tuple[str, frozenset[str]]:
    """This CPU's vendor and feature flags, as Linux reports them (empty where it does not)."""
    vendor, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def load_engine(name: EngineName, weights: Path, model: str, options: EngineOptions) -> Engine:
    return engine_module(name).load(weights, model, options)


# The engines that run a model file of their own, derived from the weights (the torch engine reads
# the weights file itself, and PyTorch is not installed on a CPU host).
DERIVED: tuple[EngineName, ...] = ("mnn", "openvino")


def prepare_engines(weights: Path, model: str) -> list[Path]:
    """Make every engine's derived model file for a verified weights file (idempotent)."""
    return [path for name in DERIVED for path in engine_module(name).prepare(weights, model)]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a derived model file, read in 1 MiB pieces once for each version of the
    file (:mod:`model.verified`)."""
    return verified.digest(path, "sha256", _sha256)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_hint(weights: Path, model: str) -> str:
    """The command that makes an engine's derived files again, for error messages."""
    from model.weights import SPECS

    return (
        f"Make it with: python -m weights prepare --model {model} {weights} "
        f"(for the released weights, {SPECS[model].fetch_command} does it too)"
    )
