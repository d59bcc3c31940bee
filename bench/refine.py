"""Edge refinement (``refine=true``): quality against ground truth, and its cost at 12 MP.

    python -m bench.refine DATASET               # DATASET/images/*.jpg, DATASET/masks/*.png
    python -m bench.refine DATASET --model u2netp --radius 1.5 --eps 1e-3

For every photo with a ground-truth mask of the same stem: the map with and without refinement,
scored as in the U²-Net paper (mean absolute error of the soft map, and the maximum over 256
thresholds of the F-measure with β² = 0.3 from the precision and recall averaged over the photos),
plus the IoU of the masks at 0.5. Then the time of ``refine`` on a 12 MP photo (a reference photo
upscaled), in ms per megapixel, against the time of the rest of such a request's work measured
the same way (decode, model, mask, PNG encode), in this process with the service's allocator
setting. The refinement is the alpha stage's (:func:`service.images.matte.refine`, on the
probability answer's 8-bit map, as the service runs it). Last, what a client sees: a real server
answering that photo's mask with and without ``refine=true``, alternating, and the median time of
each.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import REFERENCE
from bench.http import running, u2serve_server
from model.engines import DEFAULT_PRECISION, PRECISIONS
from model.postprocess import finish_on_cpu
from model.segmenter import Segmenter
from model.weights import default_weights_path
from service.core.budget import map_large_buffers
from service.images.matte import REFINE, refine

_BETA2 = 0.3


@dataclass
class Scores:
    """Per-photo MAE and IoU, and the precision/recall curves over 256 thresholds."""

    maes: list[float] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    precisions: list[np.ndarray] = field(default_factory=list)
    recalls: list[np.ndarray] = field(default_factory=list)

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        """``prob``: H×W float in [0, 1]; ``truth``: H×W bool."""
        self.maes.append(float(np.abs(prob - truth).mean()))
        mask = prob >= 0.5
        union = (mask | truth).sum()
        self.ious.append(float((mask & truth).sum() / union) if union else 1.0)
        levels = np.clip(np.rint(prob * 255), 0, 255).astype(np.int64)
        # Pixels at level ≥ t, for t = 0..255, among the foreground and among all.
        fg = np.cumsum(np.bincount(levels[truth], minlength=256)[::-1])[::-1]
        every = np.cumsum(np.bincount(levels.ravel(), minlength=256)[::-1])[::-1]
        self.precisions.append(fg / np.maximum(every, 1))
        self.recalls.append(fg / max(int(truth.sum()), 1))

    @property
    def mae(self) -> float:
        return statistics.fmean(self.maes)

    @property
    def max_f(self) -> float:
        p = np.mean(self.precisions, axis=0)
        r = np.mean(self.recalls, axis=0)
        f = (1 + _BETA2) * p * r / np.maximum(_BETA2 * p + r, 1e-12)
        return float(f.max())

    @property
    def iou(self) -> float:
        return statistics.fmean(self.ious)


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _soft(seg: Segmenter, rgb: np.ndarray) -> np.ndarray:
    """The probability answer's 8-bit map of a photo, as the service makes it."""
    (levels,) = seg.levels([rgb])
    return finish_on_cpu(levels, rgb.shape[:2], probability=True, threshold=0.5).copy()


def quality(
    seg: Segmenter, dataset: Path, *, radius: float, eps: float
) -> tuple[Scores, Scores, int]:
    """Scores without and with refinement over ``dataset``, and the number of photos."""
    plain, refined = Scores(), Scores()
    n = 0
    for photo in sorted((dataset / "images").iterdir()):
        truth_path = dataset / "masks" / f"{photo.stem}.png"
        if not truth_path.is_file():
            continue
        with Image.open(truth_path) as im:
            truth = np.array(im.convert("L")) >= 128
        rgb = _rgb(photo)
        soft = _soft(seg, rgb)
        knobs = dataclasses.replace(REFINE, radius=radius, eps=eps)
        plain.add(soft / np.float32(255), truth)
        refined.add(refine(rgb, soft, knobs=knobs) / np.float32(255), truth)
        n += 1
    return plain, refined, n


def photo_12mp() -> bytes:
    """bike.jpg upscaled to 12 MP (4243×2828), JPEG q90, as bench.http's 12mp set."""
    with Image.open(REFERENCE / "images" / "bike.jpg") as src:
        rgb = src.convert("RGB")
    w = round((12e6 * 3 / 2) ** 0.5)
    buf = io.BytesIO()
    rgb.resize((w, round(w * 2 / 3)), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _best_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def cost(seg: Segmenter, *, radius: float, eps: float, repeat: int) -> dict[str, float]:
    """Milliseconds (best of ``repeat``) of each stage of a 12 MP mask request, and of refine
    as the service runs it, with its allocator setting."""
    if not seg.engine.allocates_per_call:
        map_large_buffers()
    data = photo_12mp()

    def decode() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))

    rgb = decode()
    soft = _soft(seg, rgb)
    mask = np.where(soft >= 128, np.uint8(255), np.uint8(0))
    knobs = dataclasses.replace(REFINE, radius=radius, eps=eps)

    def encode() -> None:
        Image.fromarray(mask, "L").save(io.BytesIO(), "PNG", compress_level=1)

    return {
        "megapixels": rgb.shape[0] * rgb.shape[1] / 1e6,
        "decode": _best_ms(decode, repeat),
        "model": _best_ms(lambda: _soft(seg, rgb), repeat),
        "encode": _best_ms(encode, repeat),
        "refine": _best_ms(lambda: refine(rgb, soft, knobs=knobs), repeat),
    }


def http_cost(model: str, requests: int) -> tuple[float, float]:
    """Median seconds of a real server's answer to the 12 MP photo's mask, without and with
    ``refine=true``, requests alternating (after one warm-up request of each)."""
    data = photo_12mp()
    times: dict[bool, list[float]] = {False: [], True: []}
    env = {"U2SERVE_MODEL": model, "U2SERVE_LOG_LEVEL": "warning"}
    with (
        running(*u2serve_server(env), name="u2serve", model=model) as target,
        httpx.Client(base_url=target.url, timeout=120) as client,
    ):
        for i in range(requests + 1):
            for refined in (False, True):
                t = time.perf_counter()
                r = client.post(
                    "/segment",
                    content=data,
                    params={"refine": "true"} if refined else {},
                    headers={"content-type": "image/jpeg"},
                )
                r.raise_for_status()
                if i:
                    times[refined].append(time.perf_counter() - t)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.refine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", type=Path, help="a folder with images/ and masks/")
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision", default=DEFAULT_PRECISION, choices=PRECISIONS, help="U2SERVE_PRECISION"
    )
    p.add_argument("--radius", type=float, default=REFINE.radius)
    p.add_argument("--eps", type=float, default=REFINE.eps)
    p.add_argument("--repeat", type=int, default=3, help="timing runs; the best is kept")
    p.add_argument("--requests", type=int, default=10, help="HTTP requests of each kind")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    seg = Segmenter(
        args.model, default_weights_path(args.model), device=args.device, precision=args.precision
    )
    plain, refined, n = quality(seg, args.dataset, radius=args.radius, eps=args.eps)
    print(
        f"{args.model} ({seg.engine.name}, {args.precision}), {n} photos, radius {args.radius}, "
        f"eps {args.eps:g}"
    )
    print("            MAE      max F    IoU@0.5")
    for name, s in (("authors'", plain), ("refined", refined)):
        print(f"  {name:9} {s.mae:.5f}  {s.max_f:.5f}  {s.iou:.5f}")
    if args.no_timing:
        return
    c = cost(seg, radius=args.radius, eps=args.eps, repeat=args.repeat)
    rest = c["decode"] + c["model"] + c["encode"]
    print(
        f"12 MP ({c['megapixels']:.1f} MP): refine {c['refine']:.0f} ms "
        f"({c['refine'] / c['megapixels']:.1f} ms/MP); decode {c['decode']:.0f} ms, model "
        f"{c['model']:.0f} ms, PNG mask {c['encode']:.0f} ms: refine adds "
        f"{100 * c['refine'] / rest:.1f}% to a mask request"
    )
    plain_s, refined_s = http_cost(args.model, args.requests)
    print(
        f"over HTTP, median of {args.requests}: mask {plain_s * 1000:.0f} ms, with refine "
        f"{refined_s * 1000:.0f} ms: refine adds {100 * (refined_s / plain_s - 1):.1f}%"
    )


if __name__ == "__main__":
    main()
