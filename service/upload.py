"""Reading the request: the image bytes (multipart field ``image`` or a raw image body), or the
id of an image uploaded before (``image_id``, in the query or a form field, with an empty or
form-encoded body), and the parameters (query string or form fields), within the byte limit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from service.cache import valid_image_id
from service.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidParameter,
    RequestTimeout,
    UnsupportedImage,
)
from service.params import SegmentParams, parse_params

__all__ = ["IMAGE_ID", "MULTIPART_OVERHEAD", "Upload", "read_upload"]

IMAGE_ID = "image_id"

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


@dataclass(frozen=True)
class Upload:
    """What a request sent: the image's bytes, or the id of one uploaded before; never both."""

    params: SegmentParams
    image: bytes | None
    image_id: str | None


def _image_id(query: dict[str, str], fields: dict[str, str]) -> str | None:
    """``image_id`` taken out of the query and the form fields (the form's wins), checked."""
    given = fields.pop(IMAGE_ID, None)
    in_query = query.pop(IMAGE_ID, None)
    image_id = given if given is not None else in_query
    if image_id is not None and not valid_image_id(image_id):
        raise InvalidParameter(
            "image_id: not an image id; give the X-Image-Id of an earlier answer, or the image"
        )
    return image_id


def _both() -> InvalidParameter:
    return InvalidParameter("image_id: give the image or the id of one sent before, not both")


async def read_upload(request: Request, max_bytes: int, timeout_s: float = 60.0) -> Upload:
    """The image bytes (or an image id) and the validated parameters; 400/408/413/415/422 on
    anything else."""
    query = request.query_params.multi_items()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        # A form-encoded body carries only fields (an image id and parameters): small.
        limit = max_bytes if ctype == "multipart/form-data" else 0
        body = await _read_body(request, limit + MULTIPART_OVERHEAD, timeout_s)

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
        given, form_fields = _once(query), _once(fields)
        image_id = _image_id(given, form_fields)
        if image is None and image_id is None:
            raise BadRequest("the body has no field named 'image' (nor an 'image_id')")
        if image is not None and image_id is not None:
            raise _both()
        if image is not None and len(image) > max_bytes:
            raise ImageTooLarge(f"the image is {len(image)} bytes; the limit is {max_bytes}")
        # A form field takes precedence over the query parameter of the same name, but a bad
        # query parameter is refused all the same.
        parse_params(given)
        return Upload(parse_params(given | form_fields), image, image_id)
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        given = _once(query)
        image_id = _image_id(given, {})
        params = parse_params(given)  # cheap: validate before reading the body
        data = await _read_body(request, max_bytes, timeout_s)
        if image_id is None:
            return Upload(params, data, None)
        if data:
            raise _both()
        return Upload(params, None, image_id)
    raise UnsupportedImage(
        f"content type {ctype!r} is not accepted: send the image as the multipart field "
        "'image', or as the raw body with an image/* content type (or an image_id)"
    )
