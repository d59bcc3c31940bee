"""rembg's ``/api/remove`` on u2serve against ``rembg s`` itself: the same requests to both.

    python -m bench.compat                          # U2NET, six reference photos
    python -m bench.compat --photos all --per-photo # every reference photo, each one's IoU

Starts u2serve (``python -m service``, the model given, ``U2SERVE_URL_ALLOW`` naming the photo
server's address) and ``rembg s`` (installed into ``bench/.rembg-venv`` as ``bench.http`` does,
on the very ONNX file that ``python -m weights fetch`` verified), both at once: this compares
answers, not speed. Each case, valid and invalid, is sent to both as rembg's README and its API
document spell it (the image as the multipart field ``file``, options as form fields, ``bgc`` in
the query, ``?url=``), every valid one for each photo. A table follows: per case, each server's
status and content type, whether they agree, whether the images have the same size, and the
IoU of the two masks, each thresholded at 128 (the alpha of a cut-out; a mask itself; for a
cut-out on an opaque ``bgc``, the alpha recovered from the composite and the photo).

rembg refuses every private and loopback address for ``?url=``, and this machine can serve
photos from no other: so the ``?url=`` case sends rembg the same photo as an upload, and a
second case checks that both refuse a loopback URL that u2serve is not told it may fetch.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

from bench import REFERENCE
from bench.http import rembg_server, running, u2serve_server
from bench.url import HOST, static_server

DEFAULT_PHOTOS = [
    "horse.jpg",
    "girl.png",
    "boat.jpg",
    "lamp2_meitu_1.jpg",
    "vangogh.jpeg",
    "0002-01.jpg",
]
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, str] = field(default_factory=dict)  # the query string
    fields: dict[str, str] = field(default_factory=dict)  # form fields
    file: bytes | None = None


@dataclass(frozen=True)
class Case:
    """One request, as each server is sent it (``photo``: the photo's name, for the valid
    cases); ``mask``: how its answer's mask is read (None: an error is expected)."""

    name: str
    build: Callable[[str, str, bool], Request]  # (photo name, photo server URL, rembg?)
    mask: Callable[[np.ndarray, np.ndarray], np.ndarray] | None


@dataclass
class Outcome:
    status: int
    ctype: str
    image: np.ndarray | None


def alpha(answer: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """A cut-out's mask: its alpha."""
    return answer[..., 3] >= 128


def grey(answer: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """A mask's mask: itself (a grey PNG)."""
    return (answer if answer.ndim == 2 else answer[..., 0]) >= 128


def on_white(answer: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """The mask of a cut-out composed on opaque white: its alpha recovered as
    (answer - white) / (photo - white), where the photo is far enough from white to tell (other
    pixels count as background in both)."""
    rgb = answer[..., :3].astype(np.float32)
    distance = photo.astype(np.float32) - 255
    far = np.abs(distance) >= 64
    ratio = np.where(far, (rgb - 255) / np.where(far, distance, 1), 0)
    return ratio.max(axis=-1) >= 0.5


def _cases(model: str, refused_url: str) -> list[Case]:
    def upload(**fields: str) -> Callable[[str, str, bool], Request]:
        def build(name: str, base: str, rembg: bool) -> Request:
            return Request(
                "POST", {}, {"model": model, **fields}, (REFERENCE / "images" / name).read_bytes()
            )

        return build

    def with_query(**params: str) -> Callable[[str, str, bool], Request]:
        def build(name: str, base: str, rembg: bool) -> Request:
            return Request(
                "POST", params, {"model": model}, (REFERENCE / "images" / name).read_bytes()
            )

        return build

    def by_url(name: str, base: str, rembg: bool) -> Request:
        if rembg:  # it refuses every loopback address: the same photo, uploaded
            return upload()(name, base, rembg)
        return Request("GET", {"url": f"{base}/{name}", "model": model})

    def fixed(req: Request) -> Callable[[str, str, bool], Request]:
        return lambda name, base, rembg: req

    photo = (REFERENCE / "images" / "horse.jpg").read_bytes()
    return [
        Case("POST file (the cut-out)", upload(), alpha),
        Case("POST file, om=true (the mask)", upload(om="true"), grey),
        Case("POST file, om=true, ppm=true", upload(om="true", ppm="true"), grey),
        Case("POST file, ppm=true", upload(ppm="true"), alpha),
        Case("POST file, ?bgc=255,255,255,255", with_query(bgc="255,255,255,255"), on_white),
        Case("POST file, a=true (alpha matting)", upload(a="true"), alpha),
        Case("GET ?url= (rembg: the same photo uploaded)", by_url, alpha),
        Case(
            "GET ?url= a loopback address not allowed",
            fixed(Request("GET", {"url": refused_url, "model": model})),
            None,
        ),
        Case("GET ?url=ftp://…", fixed(Request("GET", {"url": "ftp://example.com/a.jpg"})), None),
        Case("GET without url", fixed(Request("GET", {"model": model})), None),
        Case("POST without file", fixed(Request("POST", {}, {"model": model, "om": "true"})), None),
        Case("POST om=maybe", fixed(Request("POST", {}, {"om": "maybe"}, photo)), None),
        Case("POST af=300", fixed(Request("POST", {}, {"af": "300"}, photo)), None),
        Case("POST model=nope", fixed(Request("POST", {}, {"model": "nope"}, photo)), None),
        Case("POST a file that is no image", fixed(Request("POST", {}, {}, b"not a photo")), None),
    ]


def send(client: httpx.Client, url: str, req: Request) -> Outcome:
    if req.method == "GET":
        r = client.get(f"{url}/api/remove", params=req.params)
    else:
        files = None if req.file is None else {"file": ("photo", req.file, "image/jpeg")}
        r = client.post(f"{url}/api/remove", params=req.params, data=req.fields, files=files)
    ctype = r.headers.get("content-type", "-").split(";")[0]
    picture = None
    if r.status_code == 200 and ctype.startswith("image/"):
        with Image.open(io.BytesIO(r.content)) as im:
            picture = np.asarray(im)
    return Outcome(r.status_code, ctype, picture)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def photo_rgb(name: str) -> np.ndarray:
    with Image.open(REFERENCE / "images" / name) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compat", description=__doc__)
    parser.add_argument("--model", default="u2net", choices=["u2net", "u2netp"])
    parser.add_argument("--photos", nargs="+", default=DEFAULT_PHOTOS, help="names, or: all")
    parser.add_argument("--per-photo", action="store_true", help="each valid case's IoU per photo")
    args = parser.parse_args(argv)
    names = (
        sorted(p.name for p in (REFERENCE / "images").iterdir())
        if args.photos == ["all"]
        else args.photos
    )
    print(
        f"# {platform.processor() or platform.machine()}, {args.model}, "
        f"{len(names)} photos: {', '.join(names)}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        for name in names:
            (folder / name).write_bytes((REFERENCE / "images" / name).read_bytes())
        static, base = static_server(folder)
        stack.callback(static.kill)
        env = {
            "U2SERVE_MODELS": args.model,
            "U2SERVE_URL_ALLOW": HOST,
            "U2SERVE_LOG_LEVEL": "warning",
        }
        ours = stack.enter_context(running(*u2serve_server(env), "u2serve", args.model))
        theirs = stack.enter_context(running(*rembg_server(args.model), "rembg", args.model))
        client = stack.enter_context(httpx.Client(timeout=600))
        # The photo server's own port on 127.0.0.1, which u2serve is not told it may fetch from.
        refused = base.replace(HOST, "127.0.0.1") + f"/{names[0]}"
        for case in _cases(args.model, refused):
            per_photo = names if case.mask is not None else names[:1]
            results = []
            for name in per_photo:
                a = send(client, ours.url, case.build(name, base, False))
                b = send(client, theirs.url, case.build(name, base, True))
                score = None
                same_size = None
                if case.mask is not None and a.image is not None and b.image is not None:
                    same_size = a.image.shape[:2] == b.image.shape[:2]
                    if same_size:
                        photo = photo_rgb(name)
                        score = iou(case.mask(a.image, photo), case.mask(b.image, photo))
                results.append((name, a, b, same_size, score))
                if args.per_photo and case.mask is not None:
                    print(f"#   {case.name} / {name}: {a.status} {b.status} IoU {score}")
            rows.append((case, results))
    print()
    print("| case | u2serve | rembg s | status and type agree | same size | mask IoU min / mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, results in rows:
        _, a, b, _, _ = results[0]
        agree = all(x.status == y.status and x.ctype == y.ctype for _, x, y, _, _ in results)
        sizes = [s for *_, s, _ in results if s is not None]
        scores = [v for *_, v in results if v is not None]
        size_text = "-" if not sizes else ("yes" if all(sizes) else "no")
        iou_text = "-" if not scores else f"{min(scores):.4f} / {statistics.fmean(scores):.4f}"
        print(
            f"| {case.name} | {a.status} {a.ctype} | {b.status} {b.ctype} | "
            f"{'yes' if agree else 'NO'} | {size_text} | {iou_text} |"
        )


if __name__ == "__main__":
    main()
