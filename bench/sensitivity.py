"""Which layers int8 costs the most, measured: each quantized layer alone, its maps' distance
from the float32 model's, and the curve of keeping the k most harmful in float32.

    python -m bench.sensitivity --model u2net            # the ranking, bench/sensitivity/u2net.json
    python -m bench.sensitivity --model u2netp --method accuracy-control --max-drop 0.002

``bypass`` (the default) quantizes once as ``weights fetch`` does (NNCF's post-training
``quantize`` on the calibration photos, the head kept in float), then for each unit (an int8
convolution, or a quantizer before an addition) derives a model in memory with every other unit
in float32 again (:func:`model.engines.openvino_files.with_float`: float weights and bias from
the float32 graph, inputs from before their FakeQuantize), compiles it and measures it: seconds a
unit instead of a quantization. Quantized alone is the direction that adds up near float32, where
the mixed model has to be. The distance is that of the fused maps, each min–max scaled as the
service scales them, from the float32 model's, on validation inputs: the calibration photos
turned a quarter turn, which calibration never sees in that orientation; never the reference
photos the parity tests measure, nor ECSSD. Then the k most harmful units are kept in float32
together, the rest int8, for a few k: the curve from which
``model.engines.openvino_files.KEEP_MIXED`` takes its layers.

``accuracy-control`` runs NNCF's ``quantize_with_accuracy_control`` with agreement with the
float32 maps (1 − their mean absolute difference) as the metric, and prints the convolutions it
had to keep in float (slow: U2NETP's 161 quantized operations took 22 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.engines.onnx_graph import write_onnx
from model.engines.openvino_files import (
    HEAD,
    calibration_inputs,
    calibration_photos,
    float_units,
    instruction_set,
    quantize_in_memory,
    with_float,
)
from model.preprocess import prepare
from model.weights import SPECS, default_weights_path

RANKINGS = Path(__file__).resolve().parent / "sensitivity"
CURVE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def validation_inputs(model: str) -> list[np.ndarray]:
    """The calibration photos turned a quarter turn, which calibration never sees."""
    out = []
    for path in calibration_photos():
        with Image.open(path) as im:
            image = np.array(im.convert("RGB"))
        turned = np.ascontiguousarray(image.transpose(1, 0, 2)[:, ::-1])
        out.append(np.stack([prepare(turned, SPECS[model])]))
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


def quantized_convolutions(model: Any) -> list[tuple[str, float]]:
    """Each int8 convolution of a quantized model and its multiply-adds per image."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        if "fq_weights" not in op.input_value(1).get_node().get_friendly_name():
            continue
        w = op.input_value(1).get_partial_shape().to_shape()
        y = op.get_output_partial_shape(0).to_shape()
        out.append((op.get_friendly_name(), float(np.prod(w)) * y[2] * y[3]))
    return out


def _distance(maps: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean absolute difference and IoU@0.5 of scaled maps, mean and worst over the inputs."""
    maes, ious = [], []
    for got, ref in zip(maps, expected, strict=True):
        maes.append(float(np.abs(got - ref).mean()))
        a, b = got >= 0.5, ref >= 0.5
        union = (a | b).sum()
        ious.append(float((a & b).sum() / union) if union else 1.0)
    return {
        "mean_mae": round(float(np.mean(maes)), 6),
        "worst_mae": round(max(maes), 6),
        "mean_iou": round(float(np.mean(ious)), 5),
        "worst_iou": round(min(ious), 5),
    }


def _compile(core: Any, model: Any, threads: int) -> Any:
    # As the engine compiles it: float layers in float32 (not bfloat16), latency mode.
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
    }
    return core.compile_model(model, "CPU", config)


def rank(model: str, threads: int) -> dict[str, Any]:
    """Quantize once, then return each int8 convolution alone to float32 and measure."""
    import openvino as ov

    start = time.perf_counter()
    weights = default_weights_path(model)
    with tempfile.TemporaryDirectory(prefix="u2serve-sensitivity-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(weights, model, onnx_path)
        float_model = ov.convert_model(onnx_path)
    quantized = quantize_in_memory(float_model, model, HEAD)
    # Static shapes, as the engine compiles them (and so that each layer's cost is known).
    size = SPECS[model].input_size
    for graph in (float_model, quantized):
        graph.reshape({graph.input(0).get_any_name(): [1, 3, size, size]})
    quantize_s = time.perf_counter() - start
    core = ov.Core()
    validation = validation_inputs(model)
    reference = _compile(core, float_model, threads)
    expected = [_scaled(reference(x)[0]) for x in validation]

    def measure(graph: Any) -> dict[str, float]:
        compiled = _compile(core, graph, threads)
        return _distance([_scaled(compiled(x)[0]) for x in validation], expected)

    units = float_units(quantized)
    macs = dict(quantized_convolutions(quantized))
    total = sum(macs.values())
    baseline = measure(quantized)
    print(f"# {model}: {len(units)} units; head only in float: {baseline}", flush=True)
    layers = []
    for i, unit in enumerate(units):
        # Quantized alone, everything else float32: near float32, where the mixed model has to
        # be, these add up far better than what returning one layer alone to float32 does in a
        # model whose other layers are all int8 (U2NETP's maps are useless then, whichever).
        alone_int8 = measure(with_float(quantized, float_model, [u for u in units if u != unit]))
        share = round(macs.get(unit, 0.0) / total, 5)
        layers.append({"name": unit, "macs_share": share, "int8_alone": alone_int8})
        print(f"{i + 1:3}/{len(units)} {unit} {alone_int8}", flush=True)
    # The most harmful first: what quantizing the layer alone puts on the mean MAE.
    layers.sort(key=lambda r: (-r["int8_alone"]["mean_mae"], r["int8_alone"]["worst_iou"]))
    rank_s = time.perf_counter() - start
    curve = []
    for k in CURVE:
        if k > len(layers):
            break
        names = [r["name"] for r in layers[:k]]
        scores = measure(with_float(quantized, float_model, names))
        share = sum(r["macs_share"] for r in layers[:k])
        curve.append({"k": k, "macs_share": round(share, 5), **scores})
        print(f"top {k:2}: {scores}", flush=True)
    return {
        "model": model,
        "command": f"python -m bench.sensitivity --model {model}",
        "what": "each unit (an int8 convolution, or a quantizer before an addition) quantized "
        "alone with every other unit float32 (int8_alone), most harmful first; then the k most "
        "harmful kept float32 together, the rest int8 (curve). Distance of the min-max scaled "
        "fused maps from the float32 model's on the calibration photos turned a quarter turn",
        "validation_inputs": len(validation),
        "machine": f"{platform.processor() or platform.machine()}, {instruction_set()}, "
        f"{threads} threads",
        "cost_s": {
            "quantize": round(quantize_s),
            "rank": round(rank_s),
            "total": round(time.perf_counter() - start),
        },
        "head_float_only": baseline,
        "layers": layers,
        "curve": curve,
    }


def accuracy_control(model: str, max_drop: float, save: Path | None) -> None:
    import nncf
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="u2serve-sensitivity-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(default_weights_path(model), model, onnx_path)
        float_model = ov.convert_model(onnx_path)
    core = ov.Core()
    reference = core.compile_model(float_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    validation = validation_inputs(model)
    expected = [_scaled(reference(x)[0]) for x in validation]

    def agreement(compiled: Any, data: Iterable[np.ndarray]) -> tuple[float, list[float]]:
        scores = []
        for x in data:
            i = next(k for k, v in enumerate(validation) if v is x)
            scores.append(1 - float(np.abs(_scaled(compiled(x)[0]) - expected[i]).mean()))
        return float(np.mean(scores)), scores

    calibration = calibration_inputs(model)
    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        float_model,
        nncf.Dataset(calibration),
        nncf.Dataset(validation),
        agreement,
        max_drop=max_drop,
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=list(HEAD)),
    )
    print(f"# {model}: {time.perf_counter() - start:.0f} s")
    if save:
        ov.save_model(quantized, save, compress_to_fp16=False)
    print(json.dumps(float_convolutions(quantized), indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.sensitivity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2netp", choices=sorted(SPECS))
    p.add_argument("--method", default="bypass", choices=["bypass", "accuracy-control"])
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--out", type=Path, default=None, help="default: bench/sensitivity/MODEL.json")
    p.add_argument("--max-drop", type=float, default=0.0005, help="accuracy-control only")
    p.add_argument("--save", type=Path, default=None, help="accuracy-control: the model, here")
    args = p.parse_args(argv)
    os.environ.setdefault("NNCF_CI", "1")  # no usage reports
    if args.method == "accuracy-control":
        accuracy_control(args.model, args.max_drop, args.save)
        return
    threads = args.threads or len(os.sched_getaffinity(0))
    result = rank(args.model, threads)
    out = args.out or RANKINGS / f"{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['cost_s']['total']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
