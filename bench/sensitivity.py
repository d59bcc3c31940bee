"""Which layers int8 costs the most: NNCF's accuracy-controlled quantization, measured by
agreement with the float32 model's own maps, prints the convolutions it had to keep in float.

    python -m bench.sensitivity --model u2netp --max-drop 0.002
    python -m bench.sensitivity --model u2net --max-drop 0.0005 --save /tmp/u2net-ac.xml

The metric needs no labels: 1 − the mean absolute difference between the quantized and the
float32 model's fused maps (each min–max scaled, as the service scales them) on validation
inputs: the calibration photos turned a quarter turn, which calibration never sees in that
orientation; never the reference photos the parity tests measure. NNCF ranks every quantized
operation by what reverting it restores and reverts them one by one until the drop is within
``--max-drop``, printing each step. The head is always kept in float. What it reverts first, and
by how much that helps, is what ``model.engines.openvino_engine.KEEP_FLOAT`` lists beyond the
head, so ``weights fetch`` makes the model with a plain, quick ``nncf.quantize`` call. It is slow:
U2NETP's ranking of 161 quantized operations took 22 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.engines.onnx_export import export_onnx
from model.engines.openvino_engine import HEAD, calibration_inputs, calibration_photos
from model.preprocess import preprocess
from model.weights import SPECS, default_weights_path


def validation_inputs(model: str) -> list[np.ndarray]:
    out = []
    for path in calibration_photos():
        with Image.open(path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB")))
        turned = image.transpose(0, 1).flip(1).contiguous()
        out.append(preprocess([turned], SPECS[model]).numpy())
    return out


def _scaled(fused: np.ndarray) -> np.ndarray:
    m = fused[0, 0]
    return (m - m.min()) / max(float(m.max() - m.min()), 1e-12)


def float_convolutions(model: Any) -> list[str]:
    """Convolutions of an NNCF-quantized OpenVINO model whose weights are not quantized."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            source = op.input_value(1).get_node()
            if "fq_weights" not in source.get_friendly_name():
                names.append(op.get_friendly_name())
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.sensitivity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2netp", choices=sorted(SPECS))
    p.add_argument("--max-drop", type=float, default=0.0005)
    p.add_argument("--save", type=Path, default=None, help="write the quantized model here")
    args = p.parse_args(argv)
    os.environ.setdefault("NNCF_CI", "1")  # no usage reports
    import nncf
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="u2serve-sensitivity-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(default_weights_path(args.model), args.model, onnx_path)
        float_model = ov.convert_model(onnx_path)
    core = ov.Core()
    reference = core.compile_model(float_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    validation = validation_inputs(args.model)
    expected = [_scaled(reference(x)[0]) for x in validation]

    def agreement(compiled: Any, data: Iterable[np.ndarray]) -> tuple[float, list[float]]:
        scores = []
        for x in data:
            i = next(k for k, v in enumerate(validation) if v is x)
            scores.append(1 - float(np.abs(_scaled(compiled(x)[0]) - expected[i]).mean()))
        return float(np.mean(scores)), scores

    calibration = calibration_inputs(args.model)
    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        float_model,
        nncf.Dataset(calibration),
        nncf.Dataset(validation),
        agreement,
        max_drop=args.max_drop,
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=list(HEAD)),
    )
    print(f"# {args.model}: {time.perf_counter() - start:.0f} s")
    if args.save:
        ov.save_model(quantized, args.save, compress_to_fp16=False)
    print(json.dumps(float_convolutions(quantized), indent=1))


if __name__ == "__main__":
    main()
