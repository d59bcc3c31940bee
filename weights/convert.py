"""Conversions of third-party checkpoints into the fused state dict of :class:`model.u2net.U2Net`:
numpy arrays by the PyTorch module names, whose layout :mod:`model.architecture` gives."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from model.architecture import convolutions, state_shapes
from model.weights import SPECS, tensors_sha256

__all__ = ["from_onnx", "from_pth", "release_source", "save_weights"]

GPU_EXTRA = "pip install 'u2serve[gpu]'"


def from_onnx(path: str | Path, name: str) -> dict[str, np.ndarray]:
    """Map the Conv nodes of a released (batch-norm-folded) ONNX graph, in graph order, onto the
    model's convolutions in forward-call order, checking every shape and dilation."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            (attr,) = (a for a in node.attribute if a.name == "value")
            consts[node.output[0]] = numpy_helper.to_array(attr.t)
    nodes = [n for n in graph.node if n.op_type == "Conv"]
    convs = convolutions(name)
    if len(nodes) != len(convs):
        raise ValueError(
            f"{path}: {len(nodes)} Conv nodes, but {name} has {len(convs)} convolutions"
        )
    state: dict[str, np.ndarray] = {}
    for node, conv in zip(nodes, convs, strict=True):
        attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
        weight = consts[node.input[1]]
        bias = consts[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], "f4")
        dilations = attrs.get("dilations", [1, 1])
        if weight.shape != conv.weight_shape or dilations != [conv.dilation] * 2:
            raise ValueError(
                f"{path}: Conv node {node.name!r} ({weight.shape}, dilations "
                f"{attrs.get('dilations')}) does not match {conv.name} ({conv.weight_shape}, "
                f"dilation {conv.dilation})"
            )
        state[f"{conv.name}.weight"] = weight.astype(np.float32, copy=True)
        state[f"{conv.name}.bias"] = bias.astype(np.float32, copy=True)
    return state


def from_pth(path: str | Path, name: str) -> dict[str, np.ndarray]:
    """Load the authors' official ``.pth`` checkpoint (with batch norm) strictly, then fold it.

    Their format is PyTorch's own, so this needs PyTorch (the ``gpu`` extra)."""
    try:
        import torch

        from model.u2net import fuse_batchnorm, u2net, u2netp
    except ImportError as exc:
        raise RuntimeError(
            f"converting the authors' .pth checkpoint {path} needs PyTorch, which this "
            f"installation lacks: {GPU_EXTRA} (the released ONNX weights need no PyTorch: "
            f"{SPECS[name].fetch_command})"
        ) from exc
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    model = (u2net if name == "u2net" else u2netp)()
    model.load_state_dict(raw, strict=True)
    fused = fuse_batchnorm(model.eval()).state_dict()
    return {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in fused.items()}


def save_weights(
    state: Mapping[str, np.ndarray], path: str | Path, name: str, *, source: str, source_md5: str
) -> str:
    """Write a fused state dict as ``.safetensors`` (atomically) and return its tensor digest."""
    # The layout is proved before anything is written: every name of the model's fused state
    # dict, no other, each float32 of its shape (what a strict load would demand).
    expected = state_shapes(name)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"not a fused {name} state dict: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    for key, shape in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != np.float32:
            raise ValueError(
                f"{key} is {arrays[key].dtype} {arrays[key].shape}; a fused {name} state dict "
                f"has it float32 {shape}"
            )
    digest = tensors_sha256(arrays)
    meta = {
        "format": "u2serve-fused-v1",
        "model": name,
        "source": source,
        "source_md5": source_md5,
        "tensors_sha256": digest,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    save_file(arrays, str(tmp), metadata=meta)
    tmp.replace(path)
    return digest


def release_source(name: str) -> str:
    spec = SPECS[name]
    return f"{spec.package}:{spec.member}"
