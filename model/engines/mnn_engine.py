"""MNN on the CPU: Winograd 3×3 convolutions in float32, the fastest CPU engine measured here.

Its model file (``<weights>.mnn``) is derived from the verified weights by :func:`to_mnn`: the
fused network is written as an ONNX graph (:mod:`model.engines.onnx_graph`, no PyTorch) and
converted by MNN's own converter. A record beside it (``<weights>.mnn.json``) names the weights
digest it was made from and the file's SHA-256; :func:`load` checks both before use, so a stale,
truncated or swapped file is refused like a bad weights file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from model.device import CPU
from model.engines import EngineName, EngineOptions, file_sha256, prepare_hint
from model.engines.onnx_graph import INPUT, OUTPUT, write_onnx
from model.weights import WeightsError, recorded_digest, verified_digest

__all__ = ["MNNEngine", "engine_file", "load", "prepare", "record_file", "to_mnn"]

log = logging.getLogger(__name__)

# v2: converted from the ONNX graph model.engines.onnx_graph writes (v1: PyTorch's export).
_FORMAT = "u2serve-mnn-v2"


def engine_file(weights: Path) -> Path:
    return weights.with_suffix(".mnn")


def record_file(weights: Path) -> Path:
    return weights.with_suffix(".mnn.json")


def to_mnn(weights: Path, model: str, out: Path) -> str:
    """Convert verified weights to an MNN model file at ``out``; return its SHA-256."""
    with tempfile.TemporaryDirectory(prefix="u2serve-mnn-") as tmp:
        onnx_path, mnn_path = Path(tmp) / f"{model}.onnx", Path(tmp) / f"{model}.mnn"
        write_onnx(weights, model, onnx_path)
        # The converter is MNN's C++ one, called in a child process so its chatter and any crash
        # stay there. (The wheel's `mnnconvert` script would also report usage over the
        # network; the extension it wraps does not.)
        args = ["mnnconvert", "-f", "ONNX", "--modelFile", str(onnx_path)]
        args += ["--MNNModel", str(mnn_path), "--bizCode", "u2serve"]
        code = f"import sys, _tools; _tools.mnnconvert({args!r})"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        if done.returncode != 0 or not mnn_path.is_file():
            raise WeightsError(
                f"MNN's converter failed for {weights} ({done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(out.suffix + ".part")
        shutil.move(mnn_path, part)  # the temporary folder may be on another file system
        digest = file_sha256(part)
        part.replace(out)
    return digest


def _read_record(weights: Path) -> dict[str, Any]:
    try:
        record = json.loads(record_file(weights).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _check(weights: Path, model: str, weights_sha256: str) -> Path:
    """The engine file for these weights, verified; :class:`WeightsError` otherwise."""
    path, hint = engine_file(weights), prepare_hint(weights, model)
    if not path.is_file():
        raise WeightsError(f"MNN model file {path} not found. {hint}")
    record = _read_record(weights)
    if record.get("format") != _FORMAT or record.get("model") != model:
        raise WeightsError(f"{record_file(weights)} is missing or not a {model} record. {hint}")
    if record.get("weights_sha256") != weights_sha256:
        raise WeightsError(
            f"MNN model file {path} was made from other weights (tensors "
            f"{record.get('weights_sha256')}, expected {weights_sha256}). {hint}"
        )
    digest = file_sha256(path)
    if digest != record.get("sha256"):
        raise WeightsError(
            f"MNN model file {path} is corrupt: SHA-256 {digest}, expected "
            f"{record.get('sha256')}. {hint}"
        )
    return path


def prepare(weights: Path, model: str) -> list[Path]:
    """Make ``<weights>.mnn`` and its record unless a verified one is there."""
    weights_sha256 = verified_digest(weights, model)
    try:
        return [_check(weights, model, weights_sha256)]
    except WeightsError as exc:
        log.info("%s; converting", exc.args[0].split(". ")[0])
    out = engine_file(weights)
    import MNN  # only to record the converter's version

    sha256 = to_mnn(weights, model, out)
    record = {
        "format": _FORMAT,
        "model": model,
        "weights_sha256": weights_sha256,
        "sha256": sha256,
        "converter": f"MNN {MNN.version()}",
    }
    part = record_file(weights).with_suffix(".part")
    part.write_text(json.dumps(record, indent=2) + "\n")
    part.replace(record_file(weights))
    log.info("%s: wrote %s (SHA-256 %s)", model, out, sha256)
    return [out]


class MNNEngine:
    """One MNN session (the interpreter API), on one thread of its own: a session must not be
    shared across threads, and callers (warm-up, batcher, CLI) use several.

    A session, not MNN's module API: ``runSession`` lets go of the GIL while the network runs
    (the module's ``forward`` held it for all of its 0.4 s on U2NET, so the event loop and the
    codec threads stood still for every image), and making the session prepares every
    convolution (the Winograd weights: about 2 s for U2NET) at load, where the module did it in
    its first call. Same backend, same precision: the same maps, bit for bit, at every batch
    size (measured on U2NET, batches of 1-3). A new batch size re-plans the session's buffers
    (milliseconds); the prepared weights stay."""

    name: EngineName = "mnn"
    allocates_per_call = False  # MNN plans its buffers when the session is made or resized
    ready_at_load = True  # the session prepared every convolution

    def __init__(self, path: Path, threads: int, digest: str) -> None:
        self.artifact_digest: str | None = digest
        self.device = CPU
        self.dtype = "float32"
        self.arithmetic = "float32"
        self.threads = threads
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="u2serve-mnn")
        self._session = self._thread.submit(_Session, path, threads).result()

    def forward(self, x: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        return self._thread.submit(self._session.run, arr).result()


class _Session:
    """An interpreter, its session and its tensors; used on the engine's thread only."""

    def __init__(self, path: Path, threads: int) -> None:
        import MNN

        self._mnn = MNN
        self._interpreter = MNN.Interpreter(str(path))
        # precision "high": float32 everywhere ("low" would allow bf16/fp16, not faithful).
        config = {"backend": "CPU", "precision": "high", "numThread": threads}
        self._session = self._interpreter.createSession(config)
        self._input = self._interpreter.getSessionInput(self._session, INPUT)
        self._output = self._interpreter.getSessionOutput(self._session, OUTPUT)
        self._host: Any = None  # the output's host copy, kept while the shape holds

    def _tensor(self, arr: np.ndarray) -> Any:
        mnn = self._mnn
        return mnn.Tensor(arr.shape, mnn.Halide_Type_Float, arr, mnn.Tensor_DimensionType_Caffe)

    def run(self, x: np.ndarray) -> np.ndarray:
        it, session = self._interpreter, self._session
        if tuple(self._input.getShape()) != x.shape:
            it.resizeTensor(self._input, x.shape)
            it.resizeSession(session)
            self._output = it.getSessionOutput(session, OUTPUT)
            self._host = None
        self._input.copyFrom(self._tensor(x))
        code = it.runSession(session)
        if code != 0:
            raise RuntimeError(f"MNN's session failed with error code {code}")
        if self._host is None:
            self._host = self._tensor(np.empty(self._output.getShape(), np.float32))
        self._output.copyToHostTensor(self._host)
        # A view of the host tensor's memory, which the next call overwrites: copied.
        return np.array(self._host.getNumpyData(), dtype=np.float32, copy=True)


def load(weights: Path, model: str, options: EngineOptions) -> MNNEngine:
    if options.device.type != "cpu":
        raise ValueError(f"the mnn engine runs on the CPU, not {options.device}; use torch")
    if options.dtype != "float32":
        raise ValueError(f"the mnn engine computes in float32, not {options.dtype}; use torch")
    # The tensors were verified when the MNN file was made from them; what runs is that file,
    # checked by its own digest, so the weights file is only read for the digest it names.
    path = _check(weights, model, recorded_digest(weights, model))
    threads = options.threads or len(os.sched_getaffinity(0))
    return MNNEngine(path, threads, _read_record(weights)["sha256"])
