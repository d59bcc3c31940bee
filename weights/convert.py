"""Conversions of third-party checkpoints into the fused state dict of :class:`model.U2Net`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from model.u2net import U2Net, fuse_batchnorm, u2net, u2netp
from model.weights import SPECS, tensors_sha256

__all__ = ["conv_call_order", "from_onnx", "from_pth", "save_weights"]

_BUILDERS = {"u2net": u2net, "u2netp": u2netp}


def conv_call_order(model: U2Net) -> list[tuple[str, nn.Conv2d]]:
    """The model's ``Conv2d`` modules in the order its forward pass calls them.

    Runs the forward on the meta device, so it costs no memory and no arithmetic.
    """
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[str, nn.Conv2d]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _: order.append((names[mod], mod)))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        meta = model.to("meta")
        with torch.no_grad():
            meta(torch.empty(1, 3, 64, 64, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return order


def from_onnx(path: str | Path, name: str) -> dict[str, torch.Tensor]:
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
    convs = [n for n in graph.node if n.op_type == "Conv"]
    modules = conv_call_order(_BUILDERS[name](fused=True))
    if len(convs) != len(modules):
        raise ValueError(
            f"{path}: {len(convs)} Conv nodes, but {name} has {len(modules)} convolutions"
        )
    state: dict[str, torch.Tensor] = {}
    for node, (mod_name, conv) in zip(convs, modules, strict=True):
        attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
        weight = consts[node.input[1]]
        bias = consts[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], "f4")
        if tuple(weight.shape) != tuple(conv.weight.shape) or attrs.get(
            "dilations", [1, 1]
        ) != list(conv.dilation):
            raise ValueError(
                f"{path}: Conv node {node.name!r} ({weight.shape}, dilations "
                f"{attrs.get('dilations')}) does not match {mod_name} ({tuple(conv.weight.shape)}, "
                f"dilation {conv.dilation})"
            )
        state[f"{mod_name}.weight"] = torch.from_numpy(weight.astype(np.float32, copy=True))
        state[f"{mod_name}.bias"] = torch.from_numpy(bias.astype(np.float32, copy=True))
    return state


def from_pth(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Load the authors' official ``.pth`` checkpoint (with batch norm) strictly, then fold it."""
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    model = _BUILDERS[name]()
    model.load_state_dict(raw, strict=True)
    return {k: v.contiguous() for k, v in fuse_batchnorm(model.eval()).state_dict().items()}


def save_weights(
    state: dict[str, torch.Tensor], path: str | Path, name: str, *, source: str, source_md5: str
) -> str:
    """Write a fused state dict as ``.safetensors`` (atomically) and return its tensor digest."""
    # A strict load proves the layout before anything is written.
    _BUILDERS[name](fused=True).load_state_dict(state, strict=True)
    digest = tensors_sha256(state)
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
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return digest


def release_source(name: str) -> str:
    spec = SPECS[name]
    return f"{spec.package}:{spec.member}"
