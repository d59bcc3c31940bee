"""Coverage-guided fuzzing (atheris) of what a client's bytes go through before the model: the
upload parsing (multipart or raw body, parameters) and the image header and decoder.

    python -m bench.fuzz --seconds 300            # corpus seeded from the reference photos

Every input must end in a decoded image or in one of the service's own errors (400/408/413/
415/422); any other exception is a crash, which atheris reports with the input that caused it
(saved as ``crash-*`` in the working directory). The corpus lives in ``bench/.fuzz-corpus``; it
is seeded with small re-encodings of the reference photos in every format and mode the
service reads, raw and wrapped in multipart bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["service", "PIL", "starlette", "multipart"]):
    from PIL import Image
    from starlette.requests import Request

    from service.errors import ServiceError
    from service.http.upload import read_upload
    from service.images.decode import decode, read_header

from bench import REFERENCE

CORPUS = Path(__file__).resolve().parent / ".fuzz-corpus"
MAX_PIXELS = 4_000_000  # what the fuzzer may make the decoder allocate
MAX_BYTES = 1 << 20
_CTYPES = [
    "image/jpeg",
    "image/png",
    "application/octet-stream",
    "multipart/form-data; boundary=BOUNDARY",
    "multipart/form-data",
    "text/plain",
]
_QUERIES = [b"", b"output=cutout&format=webp", b"threshold=0.3&threshold=0.4", b"output=%ff"]
_LOOP = asyncio.new_event_loop()


def _request(ctype: str, query: bytes, body: bytes) -> Request:
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/segment",
        "query_string": query,
        "headers": [
            (b"content-type", ctype.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return Request(scope, receive)  # type: ignore[arg-type]


def one_input(data: bytes) -> None:
    """The fuzz target: the first byte picks the content type and query, the rest is the body."""
    if not data:
        return
    ctype = _CTYPES[data[0] % len(_CTYPES)]
    query = _QUERIES[(data[0] // len(_CTYPES)) % len(_QUERIES)]
    try:
        got = _LOOP.run_until_complete(
            read_upload(_request(ctype, query, data[1:]), MAX_BYTES, 5.0)
        )
        image = got.image
        if image is None:
            # Without url input, no bytes means an image_id (a form may hold one): nothing to
            # decode here.
            assert got.image_id is not None
            return
        header = read_header(image, max_pixels=MAX_PIXELS)
        decoded = decode(image, max_pixels=MAX_PIXELS)
    except ServiceError:
        return
    height, width = decoded.rgb.shape[:2]
    if (width, height) != (header.width, header.height) and (height, width) != (
        header.width,
        header.height,
    ):
        raise AssertionError(f"header said {header.width}×{header.height}, got {width}×{height}")
    if decoded.model_rgb.shape != decoded.rgb.shape:
        raise AssertionError("the model's view differs in shape from the image")


def _encodings(im: Image.Image) -> list[bytes]:
    out = []
    for fmt, mode, kw in [
        ("JPEG", "RGB", {"quality": 80}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "L", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {"transparency": 0}),
        ("PNG", "I;16", {}),
        ("PNG", "1", {}),
        ("WEBP", "RGBA", {"lossless": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
        ("TIFF", "CMYK", {}),
    ]:
        buf = io.BytesIO()
        src = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
        src.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


def seed_corpus() -> int:
    """Small re-encodings of the reference photos, raw and as multipart bodies."""
    CORPUS.mkdir(exist_ok=True)
    n = 0
    for path in sorted((REFERENCE / "images").iterdir())[:6]:
        with Image.open(path) as src:
            im = src.convert("RGB")
        im.thumbnail((48, 48))
        for i, encoded in enumerate(_encodings(im)):
            raw = bytes([1]) + encoded  # image/png, no query
            part = (
                b'--BOUNDARY\r\nContent-Disposition: form-data; name="output"\r\n\r\nmask\r\n'
                b'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n"
                + encoded
                + b"\r\n--BOUNDARY--\r\n"
            )
            multipart = bytes([3]) + part
            for kind, blob in (("raw", raw), ("multipart", multipart)):
                (CORPUS / f"seed-{path.stem}-{i}-{kind}").write_bytes(blob)
                n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    p.add_argument("--seconds", type=int, default=300, help="how long to fuzz")
    p.add_argument("--max-len", type=int, default=64 * 1024, help="largest input tried")
    args, rest = p.parse_known_args(argv)
    print(f"# corpus {CORPUS}: {seed_corpus()} seeds from the reference photos", flush=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={args.seconds}",
            f"-max_len={args.max_len}",
            "-rss_limit_mb=4096",
            "-print_final_stats=1",
            *rest,
            str(CORPUS),
        ],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
