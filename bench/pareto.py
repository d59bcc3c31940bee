"""The mixed model's trade: layers kept in float32 against distance from float32 and time.

    python -m bench.pareto curve DATASET --model u2net --save DIR   # distance; saves each model
    python -m bench.pareto time DIR --model u2net                   # time, with ONNX Runtime
    python -m bench.pareto agree DATASET --model u2net --precision faithful fast

``curve`` quantizes once as ``weights fetch`` does (the head in float32), then keeps in float32
the k most harmful units of the committed ranking (``bench/sensitivity/MODEL.json``, made by
``python -m bench.sensitivity``) for each k of ``--ks``, and scores each model's maps against
float32's through the service's own pipeline (the authors' 8-bit step, the resize back) on
DATASET's photos (``DATASET/images/*.jpg``; unseen by calibration and by the ranking): mean MAE,
mean IoU@0.5, the share of photos whose mask has IoU < 0.95; with ``--parity``, also against the
authors' maps for their 18 photos, as ``bench.parity`` scores them. k = 0 is int8 with the head
in float (U2NET's ``fast``). ``--orders cheap`` takes the units by harm for their cost instead
(:func:`ranked`). With ``--save`` each model is written as ``DIR/<order>-k<k>.xml`` for ``time``.

``time`` times those models, OpenVINO's float32 and ONNX Runtime's float32 on the released file,
batch 1, in alternating rounds (this machine's timings drift by ±20%). Hold the kernels to other
instruction sets with ``ONEDNN_MAX_CPU_ISA`` and ``OV_CPU_MAX_ISA`` (README, Instruction sets).

``agree`` scores the installed paths (``Segmenter`` at each ``--precision``) against
``--precision float32`` on DATASET the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import REFERENCE
from bench.parity import Parity, _score
from model.engines.openvino_files import HEAD, _float_model, quantize_in_memory, with_float
from model.postprocess import from_levels, to_levels
from model.preprocess import preprocess
from model.segmenter import Segmenter
from model.weights import SPECS, default_weights_dir, default_weights_path

RANKINGS = Path(__file__).resolve().parent / "sensitivity"
KS = (0, 1, 2, 4, 8, 16, 24, 32, 48)


def photos(dataset: Path) -> list[torch.Tensor]:
    out = []
    for path in sorted((dataset / "images").glob("*.jpg")):
        with Image.open(path) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))))
    return out


def agreement(maps: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Probability maps against float32's: mean MAE, mean and worst IoU@0.5, share IoU < 0.95."""
    maes, ious = [], []
    for got, ref in zip(maps, reference, strict=True):
        maes.append(float((got - ref).abs().mean()))
        a, b = got >= 0.5, ref >= 0.5
        union = int((a | b).sum())
        ious.append(float((a & b).sum()) / union if union else 1.0)
    return {
        "mean_mae": round(statistics.fmean(maes), 6),
        "worst_mae": round(max(maes), 6),
        "mean_iou": round(statistics.fmean(ious), 5),
        "worst_iou": round(min(ious), 5),
        "share_iou_below_0.95": round(sum(i < 0.95 for i in ious) / len(ious), 4),
    }


def _maps(run: Callable[[np.ndarray], np.ndarray], images: list[torch.Tensor], model: str) -> list:
    out = []
    for image in images:
        x = preprocess([np.asarray(image)], SPECS[model])
        levels = to_levels(run(x))
        out.append(torch.from_numpy(from_levels(levels[0], (image.shape[0], image.shape[1]))))
    return out


def _compile(core: Any, graph: Any, threads: int) -> Any:
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
    }
    return core.compile_model(graph, "CPU", config)


def _parity(run: Callable[[np.ndarray], np.ndarray], model: str) -> str:
    """Against the authors' maps for their 18 photos, as ``bench.parity`` scores them."""

    def predict(photo: Path) -> torch.Tensor:
        with Image.open(photo) as im:
            image = torch.from_numpy(np.array(im.convert("RGB")))
        (out,) = _maps(run, [image], model)
        return out

    r = _score(Parity(model, "openvino", "cpu", "int8"), REFERENCE, predict)
    return (
        f"parity MAE mean {r.mean_mae:.5f} worst {r.worst_mae:.5f}, IoU mean {r.mean_iou:.4f} "
        f"worst {r.worst_iou:.4f}"
    )


def ranked(model: str, order: str) -> list[str]:
    """The ranking's units, most harmful first (``harm``), or by harm for the multiply-adds they
    take from int8 (``cheap``: a unit's harm over its share of the int8 multiply-adds plus 0.1%,
    so that a costly layer must do far more harm to come first)."""
    layers = json.loads((RANKINGS / f"{model}.json").read_text())["layers"]
    if order == "cheap":
        layers = sorted(
            layers, key=lambda r: -r["int8_alone"]["mean_mae"] / (r["macs_share"] + 0.001)
        )
    return [layer["name"] for layer in layers]


def curve(
    dataset: Path,
    model: str,
    ks: list[int],
    save: Path | None,
    threads: int,
    parity: bool,
    orders: list[str],
) -> None:
    import openvino as ov

    ranking = json.loads((RANKINGS / f"{model}.json").read_text())
    share = {layer["name"]: layer["macs_share"] for layer in ranking["layers"]}
    float_model = _float_model(default_weights_path(model), model)
    quantized = quantize_in_memory(float_model, model, HEAD)
    core = ov.Core()
    images = photos(dataset)
    reference_model = _compile(core, float_model, threads)
    reference = _maps(lambda x: reference_model(x)[0], images, model)
    print(f"# {model}: {len(images)} photos of {dataset.name}, against float32", flush=True)
    if save:
        save.mkdir(parents=True, exist_ok=True)
    for name, k in [(name, k) for name in orders for k in ks]:
        order = ranked(model, name)
        graph = with_float(quantized, float_model, order[:k])
        compiled = _compile(core, graph, threads)
        scores = agreement(_maps(lambda x, c=compiled: c(x)[0], images, model), reference)
        convs = sum(name.endswith("/Conv/WithoutBiases") for name in order[:k])
        macs = sum(share[name] for name in order[:k])
        print(
            json.dumps(
                {"order": name, "k": k, "float_convs": convs, "macs_in_float": round(macs, 4)}
            )[:-1]
            + ", "
            + json.dumps(scores)[1:],
            flush=True,
        )
        if parity:
            print(f"  {name} k={k}: {_parity(lambda x, c=compiled: c(x)[0], model)}", flush=True)
        if save:
            ov.save_model(graph, save / f"{name}-k{k}.xml", compress_to_fp16=False)


def timing(folder: Path, model: str, threads: int, seconds: float, rounds: int) -> None:
    import onnxruntime as ort
    import openvino as ov

    core = ov.Core()
    size = SPECS[model].input_size
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    runs: dict[str, Callable[[], object]] = {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(default_weights_dir() / f"{model}.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    runs["onnxruntime float32"] = lambda: session.run(None, {name: x})
    paths = [("openvino float32", default_weights_dir() / f"{model}.f32.xml")]
    paths += sorted(
        ((f"openvino {p.stem}", p) for p in folder.glob("*-k*.xml")),
        key=lambda item: (item[0].split("-k")[0], int(item[0].split("-k")[1])),
    )
    for label, path in paths:
        graph = core.read_model(path)
        graph.reshape({graph.input(0).get_any_name(): [1, 3, size, size]})
        request = _compile(core, graph, threads).create_infer_request()
        runs[label] = lambda r=request: r.infer({0: x})
    times: dict[str, list[float]] = {label: [] for label in runs}
    for run in runs.values():  # warm-up: kernels chosen over the first calls
        for _ in range(3):
            run()
    for _ in range(rounds):
        for label, run in runs.items():
            end = time.perf_counter() + seconds / rounds
            while time.perf_counter() < end:
                t = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t)
    cap = os.environ.get("OV_CPU_MAX_ISA", "none")
    print(f"# {model}, {threads} threads, ISA cap {cap}, {rounds} alternating rounds")
    ort_ms = statistics.median(times["onnxruntime float32"]) * 1000
    for label, values in times.items():
        ms = statistics.median(values) * 1000
        print(f"{label:22} {ms:8.1f} ms  {ort_ms / ms:5.2f}× ONNX Runtime")


def agree(dataset: Path, model: str, precisions: list[str]) -> None:
    images = photos(dataset)
    weights = default_weights_path(model)
    reference = Segmenter(model, weights, device="cpu", precision="float32")
    expected = [m for image in images for m in reference.predict([image])]
    print(f"# {model}: {len(images)} photos of {dataset.name}, against {reference.arithmetic}")
    for precision in precisions:
        seg = Segmenter(model, weights, device="cpu", precision=precision)
        maps = [torch.from_numpy(m) for image in images for m in seg.predict([image])]
        print(precision, seg.engine.name, seg.arithmetic, json.dumps(agreement(maps, expected)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.pareto",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=["curve", "time", "agree"])
    p.add_argument("path", type=Path, help="curve, agree: DATASET; time: the --save folder")
    p.add_argument("--model", default="u2net", choices=sorted(SPECS))
    p.add_argument("--ks", nargs="+", type=int, default=list(KS))
    p.add_argument("--save", type=Path, default=None)
    p.add_argument("--parity", action="store_true", help="curve: also the authors' 18 photos")
    p.add_argument("--orders", nargs="+", default=["harm"], choices=["harm", "cheap"])
    p.add_argument("--precision", nargs="+", default=["faithful", "fast"])
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--seconds", type=float, default=6.0, help="timed per model, in all")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("NNCF_CI", "1")  # no usage reports
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.command == "curve":
        curve(args.path, args.model, args.ks, args.save, threads, args.parity, args.orders)
    elif args.command == "time":
        timing(args.path, args.model, threads, args.seconds, args.rounds)
    else:
        agree(args.path, args.model, args.precision)


if __name__ == "__main__":
    main()
