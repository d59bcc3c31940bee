"""The network on a device, between preprocessing and postprocessing: images in, maps out.

numpy arrays cross every boundary here; on a CPU host nothing imports PyTorch (its engines are
MNN and OpenVINO), and on a GPU the torch engine and :mod:`model.torch_stages` do the moving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from model.cascade import Cascade, load_cascade
from model.device import DTYPES, Device, resolve_device
from model.engines import (
    DEFAULT_PRECISION,
    PRECISIONS,
    Engine,
    EngineOptions,
    Precision,
    load_engine,
    resolve_engine,
)
from model.postprocess import finish_on_cpu, from_levels, to_levels
from model.preprocess import prepare
from model.weights import SPECS, WeightsSpec, recorded_digest

__all__ = ["DTYPES", "Segmenter", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)


def resolve_dtype(
    dtype: str, device: Device, spec: WeightsSpec, precision: str = DEFAULT_PRECISION
) -> str:
    """``auto`` is the model's CUDA dtype on CUDA (float16 for U2NET, float32 for U2NETP, see
    :class:`model.weights.WeightsSpec`) and float32 on the CPU: the paths the parity tests hold.
    With the ``fast`` precision it is float16 on CUDA for both models (for U2NETP at a measured
    cost, README "Faithfulness"); on the CPU the engine makes it int8, see
    :func:`model.engines.resolve_engine`. With ``float32`` it is float32 everywhere."""
    if dtype == "auto":
        if device.type != "cuda" or precision == "float32":
            return "float32"
        return "float16" if precision == "fast" else spec.cuda_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("float16 is for CUDA; on the CPU use float32 or bfloat16")
    return dtype


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
        self._staging: Any = None  # model.torch_stages.Staging, on a GPU
        self._asked: Precision = options.precision

    @property
    def device(self) -> Device:
        return self.engine.device

    @property
    def dtype(self) -> str:
        """The arithmetic of the network's body: float32, float16, bfloat16 or int8."""
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
        faithful = {"float32"}
        if self.device.type == "cuda":
            faithful.add(self.spec.cuda_dtype)
        if self.dtype == "int8" and self._asked == "faithful":
            return "faithful"
        return "faithful" if self.dtype in faithful else "fast"

    @property
    def arithmetic(self) -> str:
        """The arithmetic that runs, for people: ``float32``, ``float16``, ``bfloat16``, or for
        an int8 model ``int8+float32 (N layers)``, N convolutions kept in float32."""
        return self.engine.arithmetic

    def forward(self, x: np.ndarray) -> np.ndarray:
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
        return f"{self.name}/{self.weights_digest}/{engine}/{self.device.type}/{self.dtype}"

    def levels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The network's maps after the authors' 8-bit step, ``N×S×S`` uint8."""
        return self.levels_of([self.prepare(np.asarray(im)) for im in images])

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One uint8 ``H×W×3`` image → its normalised ``3×S×S`` input, on the CPU: the part of
        the network's input that is per image, for a thread beside the device's worker."""
        return prepare(image, self.spec)

    def maps_of(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """:meth:`levels_of`, and for each input the arithmetic that made its map: ``int8`` or
        ``float32`` under the cascade (``auto``), else :attr:`arithmetic`."""
        if isinstance(self.engine, Cascade):
            fused, looks = self.engine.forward_looks(np.stack(inputs))
            made = [self.engine.second.arithmetic if look else "int8" for look in looks]
            return to_levels(fused), made
        return self.levels_of(inputs), [self.arithmetic] * len(inputs)

    def levels_of(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Prepared inputs (:meth:`prepare`) → their 8-bit maps, ``N×S×S`` uint8 on the CPU: the
        batch's one trip to the device and back. On CUDA the batch is stacked into page-locked
        memory kept for the next batch, so the copy is one asynchronous transfer, and only the
        8-bit maps come back."""
        if self.device.type != "cuda":
            return to_levels(self.engine.forward(np.stack(inputs)))
        from model import torch_stages

        if self._staging is None:
            self._staging = torch_stages.Staging()
        engine = self.engine
        x = self._staging.batch(inputs, engine.torch_device)  # type: ignore[attr-defined]
        return torch_stages.levels_of(engine.run, x)  # type: ignore[attr-defined]

    def finish(
        self, levels: np.ndarray, size: tuple[int, int], *, probability: bool, threshold: float
    ) -> np.ndarray:
        """One ``S×S`` uint8 map → the ``H×W`` uint8 answer map, the probability's levels or
        the mask at ``threshold`` (:func:`model.postprocess.finish_on_cpu`), on the host; on a
        GPU resized on the device, so that only the answer's map crosses."""
        if self.device.type != "cuda":
            return finish_on_cpu(levels, size, probability=probability, threshold=threshold)
        from model import torch_stages

        device = self.engine.torch_device  # type: ignore[attr-defined]
        return torch_stages.finish(
            levels, size, device, probability=probability, threshold=threshold
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probability maps in [0, 1], ``H×W`` float32, on the CPU."""
        if not images:
            return []
        levels = self.levels(images)
        return [
            from_levels(lv, (im.shape[0], im.shape[1]))
            for lv, im in zip(levels, images, strict=True)
        ]

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run each batch size once, so first requests do not pay for allocation or tuning."""
        size = self.spec.input_size
        for n in batch_sizes:
            self.levels([np.zeros((size, size, 3), np.uint8)] * n)
        log.info(
            "warmed up %s with %s on %s (%s), batch sizes %s",
            self.name,
            self.engine.name,
            self.device,
            self.dtype,
            list(batch_sizes),
        )
