"""Model-only throughput and latency: the network on 320×320 inputs, per device, dtype and batch.

    python -m bench.model                       # u2net, every device here, its default dtypes
    python -m bench.model --model u2netp --dtypes float32 bfloat16 --batches 1 2 4
    python -m bench.model --dtypes float32 --onnxruntime   # rembg's engine for reference

Prints one row per configuration: images/s, latency per batch (median and p90), FLOP per image
and achieved FLOP/s. Preprocessing and postprocessing are not included: this is the ceiling the
HTTP benchmark is compared against.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.segmenter import Segmenter, resolve_device
from model.weights import default_weights_dir, default_weights_path

CPU_BATCHES = (1, 2, 4)
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Row:
    device: str
    dtype: str
    batch: int
    images_per_s: float
    p50_ms: float
    p90_ms: float
    gflop_per_image: float
    tflops: float


def flop_per_image(seg: Segmenter) -> float:
    x = torch.zeros(1, 3, seg.spec.input_size, seg.spec.input_size)
    with FlopCounterMode(display=False) as counter:
        seg.forward(x)
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object],
    device: torch.device,
    label: tuple[str, str],
    batch: int,
    seconds: float,
    flop: float,
) -> Row:
    # oneDNN and cuDNN choose and cache kernels over the first calls: warm up for a while.
    warm_end = time.perf_counter() + min(seconds, 3.0)
    for i in range(1000):
        fn()
        if i >= 2 and time.perf_counter() > warm_end:
            break
    _sync(device)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    p50 = statistics.median(times)
    p90 = statistics.quantiles(times, n=10)[-1]
    ips = batch / p50
    return Row(
        label[0], label[1], batch, ips, p50 * 1000, p90 * 1000, flop / 1e9, ips * flop / 1e12
    )


def measure(seg: Segmenter, batch: int, seconds: float, flop: float) -> Row:
    size = seg.spec.input_size
    x = torch.randn(batch, 3, size, size).to(seg.device)
    label = (str(seg.device), str(seg.dtype).removeprefix("torch."))
    return timed(lambda: seg.forward(x), seg.device, label, batch, seconds, flop)


def onnxruntime_row(name: str, seconds: float, flop: float) -> Row:
    """The released ONNX graph (batch 1) under ONNX Runtime: rembg's engine, for reference."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(
        str(default_weights_dir() / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: np.random.rand(1, 3, 320, 320).astype(np.float32)}
    return timed(
        lambda: session.run(None, feed),
        torch.device("cpu"),
        ("cpu/ort", "float32"),
        1,
        seconds,
        flop,
    )


def show(r: Row) -> None:
    print(
        f"{r.device:8} {r.dtype:9} {r.batch:>5} {r.images_per_s:>9.2f} {r.p50_ms:>9.1f} "
        f"{r.p90_ms:>9.1f} {r.gflop_per_image:>10.1f} {r.tflops:>8.3f}",
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
    p.add_argument(
        "--dtypes",
        nargs="*",
        default=None,
        help="default: float32 (+bfloat16) on cpu; float16 bfloat16 float32 on cuda",
    )
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--seconds", type=float, default=5.0, help="timed run per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="also time the released ONNX file under ONNX Runtime (rembg's engine)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    weights = default_weights_path(args.model)
    print(
        f"# {args.model}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print(
        f"{'device':8} {'dtype':9} {'batch':>5} {'img/s':>9} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'GFLOP/img':>10} {'TFLOP/s':>8}"
    )
    for dev in devices:
        device = resolve_device(dev)
        dtypes = args.dtypes or (
            ["float16", "bfloat16", "float32"] if device.type == "cuda" else ["float32", "bfloat16"]
        )
        batches = args.batches or (GPU_BATCHES if device.type == "cuda" else CPU_BATCHES)
        for dtype in dtypes:
            seg = Segmenter(
                args.model,
                weights,
                device=dev,
                dtype=dtype,
                channels_last=not args.no_channels_last,
            )
            flop = flop_per_image(seg)
            for batch in batches:
                show(measure(seg, batch, args.seconds, flop))
    if args.onnxruntime:
        show(onnxruntime_row(args.model, args.seconds, flop))


if __name__ == "__main__":
    main()
