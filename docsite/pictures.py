"""Make the manual's pictures from one of the project's own test photos, by the service's own
code (:class:`u2serve.Remover`, the pipeline ``POST /segment`` runs), so they show what the
service answers: ``python -m docsite.pictures``.

The photo is the U²-Net authors' ``horse.jpg`` from ``tests/data/reference`` (Apache-2.0, as
its README says). The files are small (under 300 kB together) and committed in
``docs/images``."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

import u2serve

__all__ = ["main", "make_pictures"]

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "tests" / "data" / "reference" / "images" / "horse.jpg"
OUT = REPO / "docs" / "images"
# Wide enough to see the edges in a README, small enough to commit.
SIDE = 360
# The edge crop (the mane, in the photo's own pixels), its zoom, and a light colour under it
# where a rim of the green field would show.
EDGE_BOX = (150, 120, 290, 220)
EDGE_ZOOM = 3
EDGE_BACKGROUND = "f4f4f4"
DARK = "1b1d22"  # a dark page, where a light rim of the old background would show


def _edge(
    remover: u2serve.Remover,
    photo: bytes,
    *,
    refine: bool = False,
    alpha: str = "mask",
    bg_color: str = EDGE_BACKGROUND,
) -> Image.Image:
    """The cut-out on a colour at the photo's full size, cropped and zoomed: where a rim of the
    old background would show."""
    data = remover.remove(photo, output="cutout", bg_color=bg_color, refine=refine, alpha=alpha)
    with Image.open(io.BytesIO(data)) as im:
        crop = im.convert("RGB").crop(EDGE_BOX)
    w, h = crop.size
    return crop.resize((w * EDGE_ZOOM, h * EDGE_ZOOM), Image.Resampling.NEAREST)


def make_pictures(out: Path = OUT) -> list[Path]:
    """Write the photo, its mask and its cut-out at :data:`SIDE`, the edge side by side (the
    authors' map, then ``refine=true``) and the cut-out's three alphas on a dark page; return
    the files written."""
    out.mkdir(parents=True, exist_ok=True)
    photo = PHOTO.read_bytes()
    written = []
    with u2serve.Remover("u2net", device="cpu") as remover:
        (out / "horse-mask.png").write_bytes(remover.remove(photo, output="mask", max_side=SIDE))
        (out / "horse-cutout.png").write_bytes(remover.remove(photo, max_side=SIDE))
        written += [out / "horse-mask.png", out / "horse-cutout.png"]
        with Image.open(PHOTO) as im:
            im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
            im.save(out / "horse.jpg", quality=85)
        written.append(out / "horse.jpg")
        # The map's edge (the mask as alpha), then refine=true's.
        plain, refined = _edge(remover, photo), _edge(remover, photo, refine=True)
        written.append(_side_by_side([plain, refined], out / "horse-edges.png"))
        # The three alphas of a cut-out on a dark page: mask, soft, matte.
        edges = [_edge(remover, photo, alpha=a, bg_color=DARK) for a in ("mask", "soft", "matte")]
        written.append(_side_by_side(edges, out / "horse-alphas.png"))
    return written


def _side_by_side(pictures: list[Image.Image], path: Path, gap: int = 8) -> Path:
    w, h = pictures[0].size
    row = Image.new("RGB", (len(pictures) * (w + gap) - gap, h), "white")
    for i, picture in enumerate(pictures):
        row.paste(picture, (i * (w + gap), 0))
    row.save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write into")
    args = parser.parse_args()
    for path in make_pictures(args.out):
        print(f"{path.relative_to(REPO)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
