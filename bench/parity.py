"""Fidelity: our probability maps against the U²-Net authors' own maps for their test photos.

    python -m bench.parity                                  # both models, CPU, default dtype
    python -m bench.parity --engines torch mnn                  # each engine
    python -m bench.parity --models u2net --dtype bfloat16 --per-image
    python -m bench.parity --emulate float16                     # a GPU's float16, on the CPU
    python -m bench.parity --precision fast --rembg              # int8, and rembg's own maps
    python -m bench.parity --precision faithful float32 fast     # mixed (VNNI, AMX), float32, int8

Prints, per model, the mean absolute error of the maps (0..1 scale) and the IoU of the masks at
0.5, mean and worst over the photos. tests/test_parity.py holds the default paths to the bounds
mean MAE ≤ 0.001, worst ≤ 0.003, mean IoU ≥ 0.995, worst ≥ 0.99 with this same function.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import REFERENCE
from bench.emulate import emulated
from model.engines import DEFAULT_PRECISION, ENGINES, PRECISIONS
from model.engines.torch_engine import TorchEngine, torch_dtype
from model.segmenter import Segmenter
from model.weights import default_weights_path


@dataclass
class Parity:
    name: str
    engine: str
    device: str
    dtype: str
    precision: str = "faithful"  # what the path claims (model.segmenter.Segmenter.precision)
    arithmetic: str = ""  # what runs (Segmenter.arithmetic), when it says more than the dtype
    photos: list[str] = field(default_factory=list)
    maes: list[float] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)

    @property
    def mean_mae(self) -> float:
        return statistics.fmean(self.maes)

    @property
    def worst_mae(self) -> float:
        return max(self.maes)

    @property
    def mean_iou(self) -> float:
        return statistics.fmean(self.ious)

    @property
    def worst_iou(self) -> float:
        return min(self.ious)

    def summary(self) -> str:
        return (
            f"{self.name} {self.engine} {self.device} {self.arithmetic or self.dtype} "
            f"({self.precision}): MAE mean "
            f"{self.mean_mae:.5f} worst {self.worst_mae:.5f}, IoU@0.5 mean {self.mean_iou:.4f} "
            f"worst {self.worst_iou:.4f} ({len(self.maes)} photos)"
        )


def _grey(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("L"))).float() / 255


def measure(
    name: str,
    weights: Path,
    reference: Path = REFERENCE,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    engine: str = "auto",
    emulate: str | None = None,
    precision: str = DEFAULT_PRECISION,
) -> Parity:
    """Run every reference photo through the pipeline alone and compare with the authors' map.

    ``emulate`` (``float16``, ``bfloat16``): PyTorch on the CPU with the body's storage rounded
    to that type (:mod:`bench.emulate`), to judge a GPU dtype without a GPU.
    """
    if emulate is not None:
        seg = Segmenter(name, weights, device="cpu", dtype="float32", engine="torch")
        assert isinstance(seg.engine, TorchEngine)
        with emulated(seg.engine.net, torch_dtype(emulate)):
            report = _compare(seg, reference)
        report.dtype = f"{emulate} (emulated)"
        return report
    seg = Segmenter(name, weights, device=device, dtype=dtype, engine=engine, precision=precision)
    return _compare(seg, reference)


def _compare(seg: Segmenter, reference: Path) -> Parity:
    def predict(photo: Path) -> torch.Tensor:
        with Image.open(photo) as im:
            rgb = np.array(im.convert("RGB"))
        (ours,) = seg.predict([rgb])
        return torch.from_numpy(ours)

    report = Parity(
        seg.name, seg.engine.name, str(seg.device), seg.dtype, seg.precision, seg.arithmetic
    )
    return _score(report, reference, predict)


# rembg's own maps: its session's `predict` (what `rembg s` answers for a mask), run in the
# virtual environment bench/http.py installs, on the ONNX file `python -m weights fetch` verified.
_REMBG_MAPS = """
import sys
from pathlib import Path
from PIL import Image
from rembg import new_session
session = new_session(sys.argv[1])
for photo in sorted(Path(sys.argv[2]).iterdir()):
    with Image.open(photo) as im:
        (mask,) = session.predict(im.convert("RGB"))
    mask.save(Path(sys.argv[3]) / f"{photo.stem}.png")
"""


def measure_rembg(name: str, reference: Path = REFERENCE) -> Parity:
    """rembg 2.0.86's maps (ONNX Runtime on the released file, with its own preprocessing:
    Lanczos resize to 320×320, its own scaling back) scored by the same function as ours."""
    from bench.http import ensure_rembg, rembg_home

    python = ensure_rembg().parent / "python"
    with tempfile.TemporaryDirectory(prefix="u2serve-rembg-maps-") as tmp:
        env = {**os.environ, "U2NET_HOME": str(rembg_home(name)), "OMP_NUM_THREADS": "2"}
        subprocess.run(
            [str(python), "-c", _REMBG_MAPS, name, str(reference / "images"), tmp],
            env=env,
            check=True,
        )
        return _score(
            Parity(name, "rembg 2.0.86 (onnxruntime)", "cpu", "float32", "rembg"),
            reference,
            lambda photo: _grey(Path(tmp) / f"{photo.stem}.png"),
        )


def _score(out: Parity, reference: Path, predict: Callable[[Path], torch.Tensor]) -> Parity:
    for photo in sorted((reference / "images").iterdir()):
        ours = predict(photo)
        theirs = _grey(reference / out.name / f"{photo.stem}.png")
        if ours.shape != theirs.shape:
            raise ValueError(f"{photo.name}: map {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        a, b = ours >= 0.5, theirs >= 0.5
        out.photos.append(photo.name)
        out.maes.append((ours - theirs).abs().mean().item())
        out.ious.append(((a & b).sum() / (a | b).sum()).item())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=["u2net", "u2netp"], choices=["u2net", "u2netp"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engines", nargs="+", default=["auto"], choices=["auto", *ENGINES])
    p.add_argument(
        "--precision",
        nargs="+",
        default=[DEFAULT_PRECISION],
        choices=PRECISIONS,
        help="the precision(s) `auto` resolves for",
    )
    p.add_argument("--rembg", action="store_true", help="also rembg's own maps, same scores")
    p.add_argument(
        "--emulate",
        choices=["float16", "bfloat16"],
        help="PyTorch on the CPU with 16-bit storage, as on a GPU in that dtype",
    )
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--per-image", action="store_true")
    args = p.parse_args(argv)
    for name in args.models:
        reports = [
            measure(
                name,
                default_weights_path(name),
                args.reference,
                device=args.device,
                dtype=args.dtype,
                engine=engine,
                emulate=args.emulate,
                precision=precision,
            )
            for engine in args.engines
            for precision in args.precision
        ]
        if args.rembg:
            reports.append(measure_rembg(name, args.reference))
        for r in reports:
            if args.per_image:
                for photo, mae, iou in zip(r.photos, r.maes, r.ious, strict=True):
                    print(f"  {photo:22} MAE {mae:.5f}  IoU {iou:.4f}")
            print(r.summary(), flush=True)


if __name__ == "__main__":
    main()
