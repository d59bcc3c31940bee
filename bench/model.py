"""Model-only throughput and latency: the network on 320×320 inputs, per engine, device, dtype
and batch, with ONNX Runtime (rembg's engine) on the same file in the same run.

    python -m bench.model                # u2net: every engine here, ONNX Runtime, batch 1 2 4
    python -m bench.model --model u2netp --engines mnn --batches 1 --rounds 5
    python -m bench.model --engines mnn openvino --batches 1    # float32 both, int8, mixed
    ONEDNN_MAX_CPU_ISA=AVX2 OV_CPU_MAX_ISA=AVX2 python -m bench.model --engines openvino
    python -m bench.model --devices cuda --dtypes float16 float32 --batches 1 8 32 64

Configurations are timed in alternating rounds (this machine's timings drift by ±20%), after a
warm-up each. Prints one row per configuration: images/s, latency per batch (median and p90),
FLOP per image, achieved FLOP/s, and the speed relative to ONNX Runtime at batch 1. The CPU
dtypes are float32, int8 (OpenVINO's quantized model, what ``U2SERVE_PRECISION=fast`` runs) and
mixed (the int8 model with its most sensitive layers in float32, what ``faithful`` runs where
:func:`model.engines.cpu_arithmetic` chooses it; left out where it does not).
Preprocessing and postprocessing are not included: this is the ceiling the HTTP benchmark is
compared against.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.device import CPU, Device
from model.engines import ENGINES
from model.segmenter import Segmenter, resolve_device
from model.weights import default_weights_dir, default_weights_path

CPU_BATCHES = (1, 2, 4)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Config:
    engine: str
    device: Device
    dtype: str
    batch: int
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)


def flop_per_image(model: str) -> float:
    """Counted on PyTorch's graph (multiply and add counted separately): the same network."""
    seg = Segmenter(model, default_weights_path(model), device="cpu", engine="torch")
    x = np.zeros((1, 3, seg.spec.input_size, seg.spec.input_size), np.float32)
    with FlopCounterMode(display=False) as counter:
        seg.forward(x)
    return float(counter.get_total_flops())


def _sync(device: Device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(str(device))


def _timed(c: Config, seconds: float, *, keep: bool = True) -> None:
    end = time.perf_counter() + seconds
    for i in range(10_000):
        t = time.perf_counter()
        c.run()
        _sync(c.device)
        if keep:
            c.times.append(time.perf_counter() - t)
        if i >= 1 and time.perf_counter() > end:
            break


def segmenter_config(seg: Segmenter, batch: int, label: str | None = None) -> Config:
    size = seg.spec.input_size
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    dtype = label or seg.dtype
    return Config(seg.engine.name, seg.device, dtype, batch, lambda: seg.forward(x))


def onnxruntime_config(name: str, threads: int) -> Config:
    """The released ONNX graph (batch 1) under ONNX Runtime: rembg's engine, for reference."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(default_weights_dir() / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: np.random.rand(1, 3, 320, 320).astype(np.float32)}
    return Config("onnxruntime", CPU, "float32", 1, lambda: session.run(None, feed))


def show(c: Config, flop: float, reference: float | None) -> None:
    p50 = statistics.median(c.times)
    p90 = statistics.quantiles(c.times, n=10)[-1] if len(c.times) > 1 else p50
    ips = c.batch / p50
    ratio = f"{ips / reference:.2f}×" if reference else "-"
    print(
        f"{c.engine:12} {c.device.type:6} {c.dtype:9} {c.batch:>5} {ips:>8.2f} {p50 * 1000:>8.1f} "
        f"{p90 * 1000:>8.1f} {flop / 1e9:>9.1f} {ips * flop / 1e9:>9.1f} {ratio:>7}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--devices", nargs="*", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--engines", nargs="*", default=None, help="default: every engine that runs")
    p.add_argument(
        "--dtypes", nargs="*", default=None, help="default: float32 on cpu; float16 float32 on cuda"
    )
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--seconds", type=float, default=5.0, help="timed per configuration, in all")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-onnxruntime", action="store_true", help="leave ONNX Runtime out")
    args = p.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    weights = default_weights_path(args.model)
    configs: list[Config] = []
    if "cpu" in devices and not args.no_onnxruntime:
        configs.append(onnxruntime_config(args.model, threads))
    for dev in devices:
        device = resolve_device(dev)
        cpu_dtypes = ["float32", "int8", "mixed"]
        dtypes = args.dtypes or (["float16", "float32"] if device.type == "cuda" else cpu_dtypes)
        batches = args.batches or (GPU_BATCHES if device.type == "cuda" else CPU_BATCHES)
        engines = args.engines or (["torch"] if device.type == "cuda" else list(ENGINES))
        for engine in engines:
            for dtype in dtypes:
                int8 = dtype in ("int8", "mixed")
                if int8 and engine != "openvino":
                    continue  # the int8 models are OpenVINO's
                if engine in ("mnn", "openvino") and (
                    device.type != "cpu" or dtype not in cpu_dtypes
                ):
                    continue  # CPU engines with model files of their own
                seg = Segmenter(
                    args.model,
                    weights,
                    device=dev,
                    dtype="float32" if int8 else dtype,
                    engine=engine,
                    channels_last=not args.no_channels_last,
                    threads=threads,
                    # float32 is float32 here, whatever `faithful` runs on this CPU.
                    precision={"int8": "fast", "mixed": "faithful"}.get(dtype, "float32"),
                )
                if dtype == "mixed" and seg.dtype != torch.int8:
                    continue  # no mixed model for this model on this CPU
                configs += [segmenter_config(seg, batch, dtype) for batch in batches]
    flop = flop_per_image(args.model)
    print(
        f"# {args.model}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        f", {threads} threads, {args.rounds} alternating rounds of {args.seconds / args.rounds:.1f}"
        " s per configuration"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    for c in configs:  # oneDNN, MNN and cuDNN choose kernels over the first calls
        _timed(c, min(args.seconds / args.rounds, 3.0), keep=False)
    for _ in range(args.rounds):
        for c in configs:
            _timed(c, args.seconds / args.rounds)
    reference = next((c for c in configs if c.engine == "onnxruntime"), None)
    ref_ips = 1 / statistics.median(reference.times) if reference else None
    print(
        f"{'engine':12} {'device':6} {'dtype':9} {'batch':>5} {'img/s':>8} {'p50 ms':>8} "
        f"{'p90 ms':>8} {'GFLOP/img':>9} {'GFLOP/s':>9} {'vs ORT':>7}"
    )
    for c in configs:
        show(c, flop, ref_ips)


if __name__ == "__main__":
    main()
