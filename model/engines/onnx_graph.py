"""The fused network as an ONNX graph, written from the verified weights: the common source of
the engines' own model files (MNN's converter reads it, and so does OpenVINO's).

The graph is :func:`model.architecture.forward` run with operations that emit ONNX nodes, so it
needs neither PyTorch nor its exporter. Nodes are named as PyTorch's exporter names them (the
Conv of module ``side1`` is ``/side1/Conv``, the ReLU after ``stage1.rebnconvin.conv_s1`` is
``/stage1/rebnconvin/relu_s1/Relu``), so the layer names OpenVINO derives from them
(``model.engines.openvino_files.HEAD``, ``KEEP_FLOAT``, the rankings in ``bench/sensitivity``)
stay valid. The input's height and width are fixed (``SPECS[model].input_size``), so every
resize's size is known here; the batch dimension is dynamic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.architecture import Conv, forward
from model.weights import SPECS, load_state_dict

__all__ = ["INPUT", "OPSET", "OUTPUT", "fused_graph", "write_onnx"]

INPUT, OUTPUT = "input", "fused"
OPSET = 17
# The IR version that goes with opset 17 (what PyTorch's exporter wrote), not the newest the
# installed onnx package knows, which the engines' converters may not read yet.
_IR_VERSION = 8


@dataclass(frozen=True)
class _Value:
    """A tensor of the graph: its name and its shape but for the batch."""

    name: str
    channels: int
    height: int
    width: int


class _Writer:
    """:class:`model.architecture.Ops` that emit ONNX nodes."""

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        from onnx import numpy_helper

        self._to_tensor = numpy_helper.from_array
        self.state = state
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._counts: Counter[str] = Counter()

    def _name(self, scope: str, op: str) -> str:
        """PyTorch's exporter's name for the next ``op`` in module ``scope``: ``/stage1/Concat``,
        then ``/stage1/Concat_1``, …"""
        base = "/".join(["", *scope.split("."), op]) if scope else f"/{op}"
        n = self._counts[base]
        self._counts[base] += 1
        return f"{base}_{n}" if n else base

    def _node(
        self, op: str, scope: str, inputs: Sequence[str], name: str | None = None, **attrs: Any
    ) -> str:
        from onnx import helper

        name = name or self._name(scope, op)
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self._to_tensor(array, name))
        return name

    def conv(self, x: _Value, conv: Conv) -> _Value:
        weight, bias = self.state[f"{conv.name}.weight"], self.state[f"{conv.name}.bias"]
        if weight.shape != conv.weight_shape or x.channels != conv.in_ch:
            raise ValueError(
                f"{conv.name}: weights {weight.shape} on {x.channels} channels, expected "
                f"{conv.weight_shape}"
            )
        inputs = [
            x.name,
            self._constant(f"{conv.name}.weight", np.ascontiguousarray(weight, np.float32)),
            self._constant(f"{conv.name}.bias", np.ascontiguousarray(bias, np.float32)),
        ]
        out = self._node(
            "Conv",
            conv.name,
            inputs,
            dilations=[conv.dilation] * 2,
            group=1,
            kernel_shape=[conv.kernel] * 2,
            pads=[conv.padding] * 4,
            strides=[1, 1],
        )
        return _Value(out, conv.out_ch, x.height, x.width)

    def relu(self, x: _Value, scope: str) -> _Value:
        return _Value(self._node("Relu", scope, [x.name]), x.channels, x.height, x.width)

    def pool(self, x: _Value, scope: str) -> _Value:
        out = self._node(
            "MaxPool",
            scope,
            [x.name],
            ceil_mode=1,
            dilations=[1, 1],
            kernel_shape=[2, 2],
            pads=[0, 0, 0, 0],
            strides=[2, 2],
        )
        return _Value(out, x.channels, -(-x.height // 2), -(-x.width // 2))

    def upsample_like(self, x: _Value, like: _Value, scope: str) -> _Value:
        # The batch is dynamic, so Resize's sizes are the input's own batch and channels (from
        # its shape) then the known height and width, as PyTorch's exporter writes them.
        self._name(scope, "Concat")  # PyTorch's first, which gathers `like`'s height and width
        resize = self._name(scope, "Resize")
        batch_channels = self._node(
            "Slice",
            scope,
            [
                self._node("Shape", scope, [x.name]),
                self._constant(f"{resize}/starts", np.array([0], np.int64)),
                self._constant(f"{resize}/ends", np.array([2], np.int64)),
            ],
        )
        hw = self._constant(f"{resize}/height_width", np.array([like.height, like.width], np.int64))
        sizes = self._node("Concat", scope, [batch_channels, hw], axis=0)
        out = self._node(
            "Resize",
            scope,
            [x.name, "", "", sizes],
            name=resize,
            # PyTorch's bilinear interpolation with align_corners=False.
            mode="linear",
            coordinate_transformation_mode="pytorch_half_pixel",
        )
        return _Value(out, x.channels, like.height, like.width)

    def cat(self, xs: Sequence[_Value], scope: str) -> _Value:
        out = self._node("Concat", scope, [x.name for x in xs], axis=1)
        return _Value(out, sum(x.channels for x in xs), xs[0].height, xs[0].width)

    def add(self, a: _Value, b: _Value, scope: str) -> _Value:
        return _Value(self._node("Add", scope, [a.name, b.name]), a.channels, a.height, a.width)

    def sigmoid(self, x: _Value, scope: str) -> _Value:
        return _Value(self._node("Sigmoid", scope, [x.name]), x.channels, x.height, x.width)


def fused_graph(state: Mapping[str, np.ndarray], model: str) -> Any:
    """The fused network with these (verified) weights as an ``onnx.ModelProto``: input
    :data:`INPUT` ``N×3×S×S`` float32, output :data:`OUTPUT` ``N×1×S×S``, ``N`` dynamic."""
    from onnx import TensorProto, helper

    size = SPECS[model].input_size
    writer = _Writer(state)
    out = forward(writer, model, _Value(INPUT, 3, size, size))
    unused = state.keys() - {t.name for t in writer.initializers}
    if unused:
        raise ValueError(f"weights the {model} graph does not use: {sorted(unused)[:5]}")
    writer.nodes[-1].output[0] = OUTPUT  # the sigmoid's, as the exporter named it
    graph = helper.make_graph(
        writer.nodes,
        f"{model}_fused",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info(
                OUTPUT, TensorProto.FLOAT, ["batch", out.channels, out.height, out.width]
            )
        ],
        writer.initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=_IR_VERSION,
        producer_name="u2serve",
    )


def write_onnx(weights: Path, model: str, out: Path) -> None:
    """Write the fused network for verified ``weights`` to ``out``, batch dimension dynamic."""
    import onnx

    onnx.save(fused_graph(load_state_dict(weights, model), model), str(out))
