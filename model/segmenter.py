"""The network on a device, between preprocessing and postprocessing: images in, maps out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

from model.cascade import Cascade, load_cascade
from model.engines import (
    DEFAULT_PRECISION,
    PRECISIONS,
    Engine,
    EngineOptions,
    Precision,
    load_engine,
    resolve_engine,
)
from model.postprocess import from_levels, levels_on_cpu, to_levels
from model.preprocess import prepare, preprocess
from model.weights import SPECS, WeightsSpec, recorded_digest

__all__ = ["DTYPES", "Segmenter", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def resolve_dtype(
    dtype: str, device: torch.device, spec: WeightsSpec, precision: str = DEFAULT_PRECISION
) -> torch.dtype:
    """``auto`` is the model's CUDA dtype on CUDA (float16 for U2NET, float32 for U2NETP, see
    :class:`model.weights.WeightsSpec`) and float32 on the CPU: the paths the parity tests hold.
    With the ``fast`` precision it is float16 on CUDA for both models (for U2NETP at a measured
    cost, README "Faithfulness"); on the CPU the engine makes it int8, see
    :func:`model.engines.resolve_engine`. With ``float32`` it is float32 everywhere."""
    if dtype == "auto":
        if device.type != "cuda" or precision == "float32":
            return torch.float32
        return torch.float16 if precision == "fast" else DTYPES[spec.cuda_dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    if DTYPES[dtype] is torch.float16 and device.type == "cpu":
        raise ValueError("float16 is for CUDA; on the CPU use float32 or bfloat16")
    return DTYPES[dtype]


class Segmenter:
    """A loaded U²-Net: ``predict`` turns uint8 ``H×W×3`` images of any sizes into probability
    maps at each image's own size, faithful to the authors' test script. Only the network itself
    runs on the chosen engine (:mod:`model.engines`); pre- and postprocessing are shared."""

    def __init__(
        self,
        name: str,
        weights: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        engine: str = "auto",
        channels_last: bool = True,
        threads: int | None = None,
        precision: str = DEFAULT_PRECISION,
        threshold: float | None = None,
    ) -> None:
        """``threshold``: for ``auto`` on the CPU, the cascade's threshold in place of the one
        recorded for the model (0: float32 for every photo, 1: int8 for every one)."""
        if name not in SPECS:
            raise ValueError(f"model must be one of {', '.join(SPECS)}, not {name!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.spec = SPECS[name]
        resolved = resolve_device(device)
        options = EngineOptions(
            resolved,
            resolve_dtype(dtype, resolved, self.spec, precision),
            channels_last=channels_last,
            threads=threads,
            precision=cast(Precision, precision),
        )
        self.engine: Engine
        if precision == "auto" and resolved.type == "cpu" and engine == "auto":
            self.engine = load_cascade(Path(weights), name, options, threshold)
        else:
            self.engine = load_engine(
                resolve_engine(engine, options.device, options.dtype, precision, name),
                Path(weights),
                name,
                options,
            )
        self.weights_digest = recorded_digest(weights, name)
        self._pinned: Tensor | None = None
        self._asked: Precision = options.precision

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def precision(self) -> Precision:
        """What runs, whatever was asked for: ``faithful`` where the arithmetic is one the parity
        tests hold to the faithful bounds (float32; float16 on CUDA for the model whose CUDA
        default it is; the mixed int8/float32 model, which an engine loads only when asked for
        ``faithful``), ``fast`` otherwise (int8, bfloat16, float16 where it misses them)."""
        if isinstance(self.engine, Cascade):
            return "auto"
        faithful = {torch.float32}
        if self.device.type == "cuda":
            faithful.add(DTYPES[self.spec.cuda_dtype])
        if self.dtype == torch.int8 and self._asked == "faithful":
            return "faithful"
        return "faithful" if self.dtype in faithful else "fast"

    @property
    def arithmetic(self) -> str:
        """The arithmetic that runs, for people: ``float32``, ``float16``, ``bfloat16``, or for
        an int8 model ``int8+float32 (N layers)``, N convolutions kept in float32."""
        return self.engine.arithmetic

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``N×3×S×S`` input → the fused map, ``N×1×S×S`` float32."""
        return self.engine.forward(x)

    @property
    def identity(self) -> str:
        """Everything that decides the 8-bit maps, as one string: two segmenters with the same
        identity give the same levels for the same image, so it keys cached maps.

        The model, its weights' digest, the engine and the digest of the engine's own model
        file (a converted or quantised file is another network), the device type (a GPU's
        convolutions round differently from a CPU's) and the dtype. Threads and batch sizes
        are left out: the engines' outputs do not depend on them.
        """
        engine = self.engine.name + (
            f"@{self.engine.artifact_digest}" if self.engine.artifact_digest else ""
        )
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name}/{self.weights_digest}/{engine}/{self.device.type}/{dtype}"

    @torch.inference_mode()
    def levels(self, images: Sequence[Tensor]) -> Tensor:
        """The network's maps after the authors' 8-bit step, ``N×S×S`` uint8 on the device."""
        x = preprocess(images, self.spec, self.device)
        return to_levels(self.forward(x))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One uint8 ``H×W×3`` image → its normalised ``3×S×S`` input, on the CPU: the part of
        the network's input that is per image, for a thread beside the device's worker."""
        return prepare(image, self.spec)

    @torch.inference_mode()
    def maps_of(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """:meth:`levels_of`, and for each input the arithmetic that made its map: ``int8`` or
        ``float32`` under the cascade (``auto``), else :attr:`arithmetic`."""
        if isinstance(self.engine, Cascade):
            fused, looks = self.engine.forward_looks(torch.from_numpy(np.stack(inputs)))
            made = [self.engine.second.arithmetic if look else "int8" for look in looks]
            return levels_on_cpu(fused.numpy()), made
        return self.levels_of(inputs), [self.arithmetic] * len(inputs)

    @torch.inference_mode()
    def levels_of(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Prepared inputs (:meth:`prepare`) → their 8-bit maps, ``N×S×S`` uint8 on the CPU: the
        batch's one trip to the device and back, the same levels as :meth:`levels`. On CUDA the
        batch is stacked into page-locked memory kept for the next batch, so the copy is one
        asynchronous transfer."""
        if self.device.type != "cuda":
            # The 8-bit step in numpy: PyTorch's OpenMP threads would spin beside the codecs.
            return levels_on_cpu(self.forward(torch.from_numpy(np.stack(inputs))).numpy())
        staging = self._staging(len(inputs), (len(inputs), *inputs[0].shape))
        np.stack(inputs, out=staging.numpy())
        x = staging.to(self.device, non_blocking=True)
        return to_levels(self.forward(x)).cpu().numpy()

    def _staging(self, n: int, shape: tuple[int, ...]) -> Tensor:
        """Page-locked memory for ``n`` inputs, grown to the largest batch seen and reused.

        Reused only once the last transfer from it is done: the device's stream runs in order,
        and the maps of the batch that used it were copied back before this one was asked for."""
        have = self._pinned
        if have is None or have.shape[0] < n:
            have = torch.empty(shape, dtype=torch.float32).pin_memory()
            self._pinned = have
        return have[:n]

    @torch.inference_mode()
    def expand(self, levels: Tensor, size: tuple[int, int]) -> Tensor:
        """One ``S×S`` uint8 map (on any device) → the ``H×W`` probability map on the device."""
        return from_levels(levels.to(self.device), size)

    def predict(self, images: Sequence[Tensor]) -> list[Tensor]:
        """Probability maps in [0, 1], ``H×W`` float32, on the model's device."""
        if not images:
            return []
        levels = self.levels(images)
        sizes = [(im.shape[0], im.shape[1]) for im in images]
        return [self.expand(lv, hw) for lv, hw in zip(levels, sizes, strict=True)]

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run each batch size once, so first requests do not pay for allocation or tuning."""
        size = self.spec.input_size
        for n in batch_sizes:
            self.predict([torch.zeros(size, size, 3, dtype=torch.uint8)] * n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info(
            "warmed up %s with %s on %s (%s), batch sizes %s",
            self.name,
            self.engine.name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            list(batch_sizes),
        )
