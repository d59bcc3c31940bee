"""The cascade's scores, measured: which int8 maps a second look in float32 should redo.

    python -m bench.cascade ../shared/testdata/ecssd-dev/images --model u2net
    python -m bench.cascade DEV_FOLDER --check OTHER_FOLDER --model u2netp --share 0.2

For every photo of the folders: its network map in int8 (OpenVINO, as ``fast`` runs it, with the
six side maps taken from the same pass) and in float32 (what ``float32`` runs on this CPU); both
through the service's own 8-bit step and resize to the photo's size; their distance (MAE, and a
mask moved where IoU@0.5 < 0.95). Then each score, computed from the int8 pass alone at the
network's resolution, ranks the photos, and the curve says, for each share run again in float32
(the highest scores first), how many masks still move and the mean MAE left. ``oracle`` ranks by
the true MAE: the best any score can do.

The first folder is the tuning set: ``--share`` picks the threshold there (the score of the photo
at that share). Photos in ``--check`` folders are then scored against that threshold as photos
no one tuned on. The authors' 18 photos are a check of the finished cascade (``python -m
bench.parity --precision auto``), never a folder here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.cascade import SCORES, Look
from model.engines.openvino_files import engine_files
from model.postprocess import from_levels, to_levels
from model.segmenter import Segmenter
from model.weights import default_weights_path

SHARES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
MOVED_IOU = 0.95


@dataclass
class Photo:
    name: str
    mae: float  # int8 against float32, at the photo's size
    iou: float
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def moved(self) -> bool:
        return self.iou < MOVED_IOU


def _int8_with_sides(model: str, threads: int) -> Callable[[np.ndarray], tuple[Any, Any]]:
    """The int8 model as the engine compiles it, with the concatenated side logits (the
    fusion convolution's input) as a second output: one pass gives the fused map and d1…d6."""
    import openvino as ov

    xml, _ = engine_files(default_weights_path(model), "int8")
    core = ov.Core()
    net = core.read_model(xml)
    (concat,) = [op for op in net.get_ordered_ops() if op.get_type_name() == "Concat"][-1:]
    net.add_outputs([concat.output(0)])
    compiled = core.compile_model(
        net,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        },
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> tuple[Any, Any]:
        request.infer({0: x})
        return (
            np.array(request.get_output_tensor(0).data, copy=True),
            np.array(request.get_output_tensor(1).data, copy=True),
        )

    return run


def _distance(a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """MAE and IoU@0.5 of two 8-bit network maps at the photo's size."""
    pa = from_levels(a, size)
    pb = from_levels(b, size)
    ma, mb = pa >= 0.5, pb >= 0.5
    union = int((ma | mb).sum())
    iou = int((ma & mb).sum()) / union if union else 1.0
    return float(np.abs(pa - pb).mean()), iou


def measure(model: str, folder: Path, threads: int) -> list[Photo]:
    fast = Segmenter(model, default_weights_path(model), device="cpu", precision="fast")
    exact = Segmenter(model, default_weights_path(model), device="cpu", precision="float32")
    int8 = _int8_with_sides(model, threads)
    out = []
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    for i, path in enumerate(photos):
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
        x = fast.prepare(rgb)[None]
        fused, logits = int8(x)
        levels = to_levels(fused)[0]
        if i == 0:  # the bench's own compiled model gives the engine's maps
            assert np.array_equal(levels, fast.levels_of([x[0]])[0]), "int8 maps differ"
        reference = exact.levels_of([x[0]])[0]
        mae, iou = _distance(levels, reference, rgb.shape[:2])
        sides = (1 / (1 + np.exp(-logits[0].astype(np.float64)))).astype(np.float32)
        look = Look(levels, fused[0, 0], sides)
        photo = Photo(f"{folder.parent.name}/{path.name}", mae, iou)
        photo.scores = {name: float(score(look)) for name, score in SCORES.items()}
        out.append(photo)
        print(f"  {i + 1}/{len(photos)} {path.name}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def curve(photos: Sequence[Photo], key: Callable[[Photo], float]) -> list[tuple[float, int, float]]:
    """For each share in SHARES: the photos run again (highest ``key`` first), masks still
    moved, and the mean MAE against float32 with the second looks' maps in place."""
    ranked = sorted(photos, key=key, reverse=True)
    rows = []
    for share in SHARES:
        k = round(share * len(ranked))
        rest = ranked[k:]
        moved = sum(p.moved for p in rest)
        rows.append((k / len(ranked), moved, sum(p.mae for p in rest) / len(ranked)))
    return rows


def _by(name: str) -> Callable[[Photo], float]:
    return lambda p: p.scores[name]


def report(photos: Sequence[Photo]) -> None:
    n = len(photos)
    print(
        f"{n} photos; int8 alone: {sum(p.moved for p in photos)} masks moved, MAE "
        f"{statistics.fmean(p.mae for p in photos):.5f}"
    )
    header = "| score | " + " | ".join(f"{s:.0%}" for s in SHARES) + " |"
    print(header)
    print("| --- " * (len(SHARES) + 1) + "|")
    keys: dict[str, Callable[[Photo], float]] = {name: _by(name) for name in SCORES}
    keys["oracle (true MAE)"] = lambda p: p.mae
    for name, key in keys.items():
        cells = [f"{moved} / {mae:.5f}" for _, moved, mae in curve(photos, key)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("(each cell: masks moved, IoU < 0.95 against float32 / mean MAE against float32)")


def check(photos: Sequence[Photo], score: str, threshold: float) -> str:
    again = [p for p in photos if p.scores[score] >= threshold]
    kept = [p for p in photos if p.scores[score] < threshold]
    return (
        f"{len(photos)} photos: {len(again)} run again ({len(again) / len(photos):.0%}), "
        f"{sum(p.moved for p in kept)} masks moved, MAE "
        f"{sum(p.mae for p in kept) / len(photos):.5f} (int8 alone: "
        f"{sum(p.moved for p in photos)}, {statistics.fmean(p.mae for p in photos):.5f})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.cascade",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="tuning photos (never the authors' 18)")
    p.add_argument("--check", type=Path, nargs="*", default=[], help="photos no one tuned on")
    p.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    p.add_argument("--share", type=float, default=0.2, help="share run again on the tuning set")
    p.add_argument("--score", default="near", choices=list(SCORES))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--save", type=Path, help="write every photo's distances and scores (JSON)")
    args = p.parse_args(argv)
    dev = measure(args.model, args.folder, args.threads)
    report(dev)
    ranked = sorted((ph.scores[args.score] for ph in dev), reverse=True)
    k = max(0, min(len(ranked) - 1, round(args.share * len(ranked)) - 1))
    threshold = ranked[k]
    print(
        f"\n{args.model}: score {args.score}, threshold {threshold:.4f} (the score of the "
        f"photo at {args.share:.0%} of {args.folder})"
    )
    print(f"tuning set: {check(dev, args.score, threshold)}")
    held: list[Photo] = []
    for folder in args.check:
        held += measure(args.model, folder, args.threads)
    if held:
        print(f"photos no one tuned on: {check(held, args.score, threshold)}")
        report(held)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"set": "tune", **vars(ph)} for ph in dev] + [
            {"set": "check", **vars(ph)} for ph in held
        ]
        args.save.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
