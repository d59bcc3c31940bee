"""The fused network as an ONNX graph: the common source of the engines' own model files."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from model.u2net import u2net, u2netp
from model.weights import SPECS

__all__ = ["INPUT", "OUTPUT", "export_onnx"]

INPUT, OUTPUT = "input", "fused"


def export_onnx(weights: Path, model: str, out: Path) -> None:
    """Write the fused network for verified ``weights`` to ``out``, batch dimension dynamic."""
    net = (u2net if model == "u2net" else u2netp)(weights=weights).eval()
    size = SPECS[model].input_size
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript; it is
        # what this pinned torch ships, and it traces this plain convolutional graph exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, size, size),),
            str(out),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=17,
        )
