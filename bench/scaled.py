"""``fast``'s reduced decode against float32: which DCT scale keeps ``fast``'s bounds.

    python -m bench.scaled                                  # the 18 reference photos, at 12 MP
    python -m bench.scaled --mp 1 --sides 320 640           # at 1 MP
    python -m bench.scaled ../shared/testdata/ecssd-dev     # a folder of images/ (and masks/)
    python -m bench.scaled ../shared/testdata/ecssd-dev --mp 12 --sides 640 1280

Each photo (made N MP with Lanczos and saved as JPEG at quality 90 when ``--mp`` is given, else
its own bytes) is decoded in full and, for each ``--sides`` value, reduced by libjpeg-turbo to
the smallest 1/2, 1/4 or 1/8 whose sides keep that many pixels (service/images/decode.py). Maps
come from U2NET (``--model``) at ``float32`` on the full decode (the reference), at ``fast`` on
the full decode (today's ``fast``) and at ``fast`` on each reduced decode, each resized back to
the photo's size as the service does. It prints, for each, against float32: mean and worst MAE,
mean and worst IoU of the masks at 0.5, and how many masks moved (IoU < 0.95), as
``bench.pareto agree`` scores them; with a ``masks/`` folder beside ``images/``, the max F
(β² = 0.3) against the ground truth, each map reduced to the mask's size (area averaging).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench import REFERENCE
from bench.refine import Scores
from model.postprocess import from_levels
from model.segmenter import Segmenter
from model.weights import default_weights_path
from service.images.decode import Reduction, decode, read_header

_MAX_PIXELS = 200_000_000


def _photo_bytes(path: Path, mp: float | None) -> bytes:
    if mp is None:
        return path.read_bytes()
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    scale = (mp * 1e6 / (rgb.width * rgb.height)) ** 0.5
    size = (round(rgb.width * scale), round(rgb.height * scale))
    buf = io.BytesIO()
    rgb.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _map(seg: Segmenter, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The H×W probability map the service's answer is made from (``size``: H, W)."""
    levels = seg.levels_of([seg.prepare(rgb)])[0]
    return from_levels(levels, size)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaled",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", nargs="?", type=Path, default=REFERENCE, help="holds images/")
    p.add_argument("--mp", type=float, default=None, help="make each photo this many MP")
    p.add_argument("--sides", nargs="+", type=int, default=[320, 640])
    p.add_argument("--max-factor", type=int, default=8, choices=[2, 4, 8])
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--limit", type=int, default=None, help="the first N photos only")
    p.add_argument("--per-photo", action="store_true", help="each photo's IoU against float32")
    args = p.parse_args(argv)
    mp = args.mp if args.mp is not None or args.folder != REFERENCE else 12.0
    weights = default_weights_path(args.model)
    reference = Segmenter(args.model, weights, device="cpu", precision="float32")
    fast = Segmenter(args.model, weights, device="cpu", precision="fast")
    photos = sorted((args.folder / "images").iterdir())[: args.limit]
    masks = args.folder / "masks"
    variants = ["float32", "fast", *(f"fast, sides ≥ {s}" for s in args.sides)]
    mae: dict[str, list[float]] = defaultdict(list)
    iou: dict[str, list[float]] = defaultdict(list)
    scores = {v: Scores() for v in variants}
    decode_ms: dict[str, list[float]] = defaultdict(list)
    decoded_at: dict[str, set[str]] = defaultdict(set)
    for path in photos:
        data = _photo_bytes(path, mp)
        header = read_header(data, max_pixels=_MAX_PIXELS)
        t = time.process_time()
        full = decode(data, max_pixels=_MAX_PIXELS, header=header)
        decode_ms["full"].append((time.process_time() - t) * 1e3)
        size = (full.size[1], full.size[0])
        inputs = {"float32": (reference, full.model_rgb), "fast": (fast, full.model_rgb)}
        for side in args.sides:
            t = time.process_time()
            small = decode(
                data, max_pixels=_MAX_PIXELS, header=header, reduce=Reduction(side, args.max_factor)
            )
            decode_ms[f"≥ {side}"].append((time.process_time() - t) * 1e3)
            w = small.model_rgb.shape[1]
            decoded_at[f"≥ {side}"].add(f"1/{round(full.size[0] / w)}" if small.scaled else "1")
            inputs[f"fast, sides ≥ {side}"] = (fast, small.model_rgb)
        ref = None
        truth = None
        if (masks / f"{path.stem}.png").is_file():
            with Image.open(masks / f"{path.stem}.png") as im:
                truth = np.array(im.convert("L")) >= 128
        for name, (seg, rgb) in inputs.items():
            m = _map(seg, rgb, size)
            if ref is None:
                ref = m
            mae[name].append(float(np.abs(m - ref).mean()))
            a, b = m >= 0.5, ref >= 0.5
            union = int((a | b).sum())
            iou[name].append(float((a & b).sum()) / union if union else 1.0)
            if truth is not None:
                th, tw = truth.shape
                scores[name].add(cv2.resize(m, (tw, th), interpolation=cv2.INTER_AREA), truth)
        if args.per_photo:
            print(
                f"# {path.name}: IoU " + ", ".join(f"{k} {iou[k][-1]:.4f}" for k in variants[1:]),
                flush=True,
            )
    n = len(photos)
    print(
        f"# {args.folder}, {n} photos"
        + (f" made {mp:g} MP (JPEG q90)" if mp else " as they are")
        + f", {args.model}; decode CPU ms (mean): "
        + ", ".join(f"{k} {statistics.fmean(v):.1f}" for k, v in decode_ms.items())
        + "; reduced to: "
        + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in decoded_at.items())
    )
    print("| against float32 | mean MAE | worst MAE | mean IoU | worst IoU | IoU < 0.95 | max F |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in variants:
        moved = sum(i < 0.95 for i in iou[name])
        f = f"{scores[name].max_f:.5f}" if scores[name].maes else "–"
        print(
            f"| {name} | {statistics.fmean(mae[name]):.5f} | {max(mae[name]):.5f} | "
            f"{statistics.fmean(iou[name]):.4f} | {min(iou[name]):.4f} | {moved} of {n} | {f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
