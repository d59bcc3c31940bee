"""Encoding a 12 MP cut-out: time and bytes per format, with and without ``max_side``.

    python -m bench.encode                    # U2NET's mask of bench.refine's 12 MP photo
    python -m bench.encode --max-side 1024 --repeat 5
    python -m bench.encode --codec pillow     # the reference encoder (the answers before)

Runs ``service.images.encode.render`` (what the service runs in its codec pool for one answer) on
the
photo and its mask, for output=cutout as PNG, WebP, and JPEG on an opaque colour, each at full
size and scaled to ``--max-side``; prints the best time of ``--repeat`` runs and the bytes.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from bench.refine import photo_12mp
from model.segmenter import Segmenter
from model.weights import default_weights_path
from service.images.codecs import ENCODERS
from service.images.decode import decode
from service.images.encode import render
from service.params import SegmentParams

CASES: dict[str, dict[str, str]] = {
    "PNG": {"output": "cutout"},
    "WebP": {"output": "cutout", "format": "webp"},
    "JPEG on white": {"output": "cutout", "format": "jpeg", "bg_color": "ffffff"},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.encode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    p.add_argument(
        "--codec", default="vips", choices=ENCODERS, help="the encoder (service.images.codecs)"
    )
    args = p.parse_args(argv)
    image = decode(photo_12mp(), max_pixels=100_000_000)
    seg = Segmenter(args.model, default_weights_path(args.model), device="cpu")
    (prob,) = seg.predict([image.model_rgb])
    levels = np.where(prob >= 0.5, np.uint8(255), np.uint8(0))
    w, h = image.size
    share = np.count_nonzero(levels) / levels.size
    print(f"{w}×{h} ({w * h / 1e6:.1f} MP), foreground {share:.0%}")
    print(f"{'answer':16} {'max_side':>8} {'size':>11} {'ms':>7} {'bytes':>11}")
    for name, fields in CASES.items():
        for max_side in (None, args.max_side):
            extra = {} if max_side is None else {"max_side": str(max_side)}
            params = SegmentParams.model_validate(fields | extra)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                answer = render(levels, image, params, codec=args.codec)
                times.append(time.perf_counter() - t)
            with Image.open(io.BytesIO(answer.body)) as im:
                size = f"{im.width}×{im.height}"
            print(
                f"{name:16} {max_side or '-':>8} {size:>11} {min(times) * 1000:>7.0f} "
                f"{len(answer.body):>11,}",
                flush=True,
            )


if __name__ == "__main__":
    main()
