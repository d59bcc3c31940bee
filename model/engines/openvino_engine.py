"""OpenVINO on the CPU: int8 for the ``fast`` precision (about 3× ONNX Runtime's float32); the
mixed int8/float32 model, what ``faithful`` runs where int8 pays (:func:`model.engines.
cpu_arithmetic`); and float32, the faithful engine elsewhere on Intel CPUs with AVX-512
(:func:`model.engines.float32_cpu_engine`) and what ``float32`` runs.

Each runs a model file of its own, derived from the verified weights (converted, quantized) and
recorded beside them by :mod:`model.engines.openvino_files`; :func:`load` has it checked there
before use.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from model.device import CPU
from model.engines import EngineName, EngineOptions, cpu_arithmetic, cpu_features, openvino_files
from model.engines.onnx_graph import INPUT
from model.weights import recorded_digest

__all__ = ["OpenVINOEngine", "load", "prepare"]


class OpenVINOEngine:
    """One compiled model per batch size (the CPU default is 1), one request at a time."""

    name: EngineName = "openvino"
    allocates_per_call = False  # the CPU plugin plans its buffers when a shape is compiled
    ready_at_load = True  # batch 1, the CPU's, is compiled at load

    def __init__(self, path: Path, threads: int, digest: str, dtype: str, arithmetic: str) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        # Both files decide the maps: the graph (which layers stay float) and the int8 tensors.
        self.artifact_digest: str | None = digest
        self.device = CPU
        self.dtype = dtype  # int8 (the body of the int8 and mixed models), or float32
        self.arithmetic = arithmetic
        self.threads = threads
        self._core = ov.Core()
        self._model = self._core.read_model(path)
        self._config = {
            # float32 where the model is float (all of it, or int8's head): the CPU plugin
            # would otherwise run those layers in bfloat16 on CPUs that have it, outside the
            # faithful bounds (U2NET: mean MAE 0.0019, worst IoU 0.963).
            hints.inference_precision: ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: threads,
            props.num_streams: 1,
        }
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._request(1)

    def _request(self, batch: int) -> Any:
        if batch not in self._compiled:
            model = self._model.clone()
            size = model.input(0).get_partial_shape()[2].get_length()
            model.reshape({INPUT: [batch, 3, size, size]})
            compiled = self._core.compile_model(model, "CPU", self._config)
            self._compiled[batch] = compiled.create_infer_request()
        return self._compiled[batch]

    def forward(self, x: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            request = self._request(arr.shape[0])
            request.infer({0: arr})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def load(weights: Path, model: str, options: EngineOptions) -> OpenVINOEngine:
    if options.device.type != "cpu":
        raise ValueError(f"the openvino engine runs on the CPU, not {options.device}; use torch")
    # The tensors were verified when the model files were made from them; what runs is those
    # files, checked by their own digests, so the weights file is only read for the digest it
    # names.
    kind = cpu_arithmetic(model, options.precision, cpu_features()[1])
    path = openvino_files.check(weights, model, recorded_digest(weights, model), kind)
    threads = options.threads or len(os.sched_getaffinity(0))
    record = openvino_files.record_of(weights, kind)
    digest = hashlib.sha256(f"{record['xml_sha256']}:{record['bin_sha256']}".encode()).hexdigest()
    if kind == "float32":
        return OpenVINOEngine(path, threads, digest, "float32", "float32")
    layers = sum(name.endswith("/Conv/WithoutBiases") for name in record["keep_float"])
    return OpenVINOEngine(path, threads, digest, "int8", f"int8+float32 ({layers} layers)")


def prepare(weights: Path, model: str) -> list[Path]:
    """The engine's model files for verified weights (:func:`model.engines.openvino_files.
    prepare` makes them where verified ones are not there)."""
    return openvino_files.prepare(weights, model)
