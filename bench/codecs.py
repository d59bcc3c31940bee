"""Every codec stage of a 12 MP request, before (Pillow, numpy, torch) and after (the codec layer),
one thread, alternating: milliseconds, bytes out, and the memory each stage holds.

    python -m bench.codecs                      # U2NET's map of bench.refine's 12 MP photo
    python -m bench.codecs --repeat 7 --memory  # + the peak memory each stage adds, bytes per pixel

Stages: decoding the JPEG (``service.images.codecs`` decoders ``pillow`` and ``turbojpeg``); the
network's 320×320 map back to the photo's size and the mask from it (``model.postprocess``);
then ``service.images.encode.render`` with ``codec="pillow"`` (today's answers, the reference) and
``codec="vips"`` for each answer: cut-out PNG, mask PNG, probability PNG, cut-out on a colour as
JPEG q90, cut-out as lossless WebP, and a cut-out scaled to ``--max-side``; and the chains a
request runs on its codec and inference threads (decode, map back, answer) for a cut-out PNG and a
mask. Each case's best of ``--repeat`` runs, the two sides alternating. ``--memory``: the rise of
the process's peak RSS during one run of the case over its RSS before (Linux; large buffers
mapped as the service maps them, so that freed memory is not reused unseen), per pixel of the photo.

"One thread" holds each library's own thread pools to one; libvips still writes an encoded answer
from a thread of its own while the next strips are computed, so its wall time can be below its
CPU time. The CPU columns (every thread of the process, best of the runs) are what a busy server
pays for each answer.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pyvips
import torch
import torch.nn.functional as F

from bench.refine import photo_12mp
from model.preprocess import preprocess
from model.segmenter import Segmenter
from model.torch_stages import minmax, resize_maps, to_mask, to_probability
from model.weights import default_weights_path
from service.core.budget import give_back_memory, map_large_buffers
from service.images.codecs import decoder
from service.images.decode import read_header
from service.images.encode import render
from service.params import SegmentParams

ANSWERS: dict[str, dict[str, str]] = {
    "cut-out PNG (compose + encode)": {"output": "cutout"},
    "mask PNG": {"output": "mask"},
    "probability PNG": {"output": "probability"},
    "JPEG q90 on a colour (composite + encode)": {
        "output": "cutout",
        "format": "jpeg",
        "bg_color": "ffffff",
    },
    "cut-out WebP lossless": {"output": "cutout", "format": "webp"},
}
MAX_PIXELS = 100_000_000


def torch_map_back(raw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The map back to full size and the mask as they were before OpenCV's upscale."""
    levels = minmax(raw).mul_(255).floor_()
    out = F.interpolate(levels, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return (out[0, 0].div_(255) >= 0.5).to(torch.uint8).mul_(255)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rise(fn: Callable[[], object]) -> int:
    """Bytes by which one run of ``fn`` raised the process's peak RSS over its RSS before."""
    give_back_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def best_ms(
    fns: dict[str, Callable[[], object]], repeat: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Each function's best wall time and best CPU time (every thread of the process) in ms over
    ``repeat`` rounds, the functions alternating."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: min(v) * 1000 for k, v in wall.items()}, {k: min(v) * 1000 for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.codecs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5, help="runs per case; the best is kept")
    p.add_argument("--memory", action="store_true", help="also the peak memory of each stage")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    pyvips.concurrency_set(1)
    if args.memory:
        map_large_buffers()
    data = photo_12mp()
    header = read_header(data, max_pixels=MAX_PIXELS)
    image = decoder("turbojpeg").decode(data, header)
    assert image is not None
    seg = Segmenter(args.model, default_weights_path(args.model), device="cpu")
    with torch.inference_mode():
        raw = torch.from_numpy(seg.forward(preprocess([image.model_rgb], seg.spec)))
    hw = image.rgb.shape[:2]
    (prob,) = resize_maps(raw, [hw])
    levels = {"mask": to_mask(prob, 0.5).numpy(), "probability": to_probability(prob).numpy()}
    w, h = image.size
    mp = w * h / 1e6
    share = np.count_nonzero(levels["mask"]) / levels["mask"].size
    print(
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, one thread; {w}×{h} "
        f"({mp:.1f} MP) JPEG q90, {len(data):,} bytes; {args.model}'s mask: {share:.0%} foreground"
    )
    print(
        f"{'stage':44} {'before ms':>9} {'after ms':>9} {'speed-up':>8} "
        f"{'before CPU':>10} {'after CPU':>9} "
        f"{'before bytes':>13} {'after bytes':>13}"
        + (f" {'before B/px':>11} {'after B/px':>10}" if args.memory else "")
    )

    def row(
        name: str,
        before: Callable[[], object],
        after: Callable[[], object],
        sizes: tuple[int, int] | None = None,
    ) -> None:
        ms, cpu = best_ms({"before": before, "after": after}, args.repeat)
        out = sizes or (0, 0)
        line = (
            f"{name:44} {ms['before']:>9.1f} {ms['after']:>9.1f} "
            f"{ms['before'] / ms['after']:>7.1f}× {cpu['before']:>10.1f} {cpu['after']:>9.1f} "
            + (f"{out[0]:>13,} {out[1]:>13,}" if sizes else f"{'':>13} {'':>13}")
        )
        if args.memory:
            px = w * h
            line += f" {peak_rise(before) / px:>11.1f} {peak_rise(after) / px:>10.1f}"
        print(line, flush=True)

    pillow_dec, turbo_dec = decoder("pillow"), decoder("turbojpeg")
    row(
        "decode the JPEG to RGB",
        lambda: pillow_dec.decode(data, header),
        lambda: turbo_dec.decode(data, header),
    )
    row(
        "320² map back to 12 MP, mask",
        lambda: torch_map_back(raw, hw),
        lambda: to_mask(resize_maps(raw, [hw])[0], 0.5),
    )
    cases = dict(ANSWERS)
    cases[f"cut-out PNG, max_side {args.max_side}"] = {
        "output": "cutout",
        "max_side": str(args.max_side),
    }
    for name, fields in cases.items():
        params = SegmentParams.model_validate(fields)
        lv = levels["probability" if params.output == "probability" else "mask"]
        sizes = (
            len(render(lv, image, params, codec="pillow").body),
            len(render(lv, image, params, codec="vips").body),
        )
        row(
            name,
            lambda lv=lv, params=params: render(lv, image, params, codec="pillow"),
            lambda lv=lv, params=params: render(lv, image, params, codec="vips"),
            sizes,
        )
    for output in ("cutout", "mask"):
        params = SegmentParams.model_validate({"output": output})

        def chain(dec: str, codec: str, params: SegmentParams = params) -> None:
            img = decoder(dec).decode(data, header)
            assert img is not None
            before = dec == "pillow"
            lv = torch_map_back(raw, hw) if before else to_mask(resize_maps(raw, [hw])[0], 0.5)
            lv = lv.numpy()
            render(lv, img, params, codec=codec)

        row(
            f"chained {output} PNG (decode, map back, answer)",
            lambda chain=chain: chain("pillow", "pillow"),
            lambda chain=chain: chain("turbojpeg", "vips"),
        )


if __name__ == "__main__":
    main()
