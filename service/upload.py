"""Reading the request: the image bytes (multipart field ``image`` or a raw image body) and the
parameters (query string or form fields), within the byte limit."""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from service.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidParameter,
    RequestTimeout,
    UnsupportedImage,
)
from service.params import SegmentParams, parse_params

__all__ = ["MULTIPART_OVERHEAD", "read_upload"]

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and the small parameter fields


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` seconds (408 after that).

    A body over the limit is answered 413 without reading the rest: the server reads and
    drops what still comes on that connection, so the client gets the answer rather than a
    reset (and a client that sent ``Expect: 100-continue`` is never asked for the body).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"the request is {declared} bytes; the limit is {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ImageTooLarge(f"the request is over the limit of {limit} bytes")
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s "
            f"({len(body)} bytes came); send it faster or in one go"
        ) from None
    return bytes(body)


def _once(items: list[tuple[str, str]]) -> dict[str, str]:
    """Parameters by name; one given twice in the same place (the query, or the form) is
    refused rather than one of its values silently chosen."""
    values: dict[str, str] = {}
    for key, value in items:
        if key in values:
            raise InvalidParameter(f"{key}: given more than once")
        values[key] = value
    return values


async def read_upload(
    request: Request, max_bytes: int, timeout_s: float = 60.0
) -> tuple[bytes, SegmentParams]:
    """The image bytes and the validated parameters; 400/408/413/415/422 on anything else."""
    query = request.query_params.multi_items()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        body = await _read_body(request, max_bytes + MULTIPART_OVERHEAD, timeout_s)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except MultiPartException as exc:
            raise BadRequest(f"malformed multipart body: {exc.message}") from exc
        except HTTPException as exc:  # what starlette makes of a MultiPartException in an app
            raise BadRequest(f"malformed multipart body: {exc.detail}") from exc
        fields: list[tuple[str, str]] = []
        image: bytes | None = None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise InvalidParameter(f"{key}: unexpected file field (send 'image')")
                    image = await value.read()
                elif key == "image":
                    image = value.encode("latin-1", "replace")
                else:
                    fields.append((key, value))
        finally:
            await form.close()
        if image is None:
            raise BadRequest("the multipart body has no field named 'image'")
        if len(image) > max_bytes:
            raise ImageTooLarge(f"the image is {len(image)} bytes; the limit is {max_bytes}")
        # A form field takes precedence over the query parameter of the same name, but a bad
        # query parameter is refused all the same.
        given = _once(query)
        parse_params(given)
        return image, parse_params(given | _once(fields))
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        params = parse_params(_once(query))  # cheap: validate before reading the body
        return await _read_body(request, max_bytes, timeout_s), params
    raise UnsupportedImage(
        f"content type {ctype!r} is not accepted: send the image as the multipart field "
        "'image', or as the raw body with an image/* content type"
    )
