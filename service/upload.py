"""Reading the request: the image bytes (multipart field ``image`` or a raw image body) and the
parameters (query string or form fields), within the byte limit."""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from service.errors import BadRequest, ImageTooLarge, InvalidParameter, UnsupportedImage
from service.params import SegmentParams, parse_params

__all__ = ["read_upload"]

_MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and the small parameter fields


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"the request is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ImageTooLarge(f"the request is over the limit of {limit} bytes")
    return bytes(body)


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, SegmentParams]:
    """The image bytes and the validated parameters; 400/413/415/422 on anything else."""
    query = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        body = await _read_body(request, max_bytes + _MULTIPART_OVERHEAD)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except MultiPartException as exc:
            raise BadRequest(f"malformed multipart body: {exc.message}") from exc
        fields: dict[str, str] = {}
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
                    fields[key] = value
        finally:
            await form.close()
        if image is None:
            raise BadRequest("the multipart body has no field named 'image'")
        if len(image) > max_bytes:
            raise ImageTooLarge(f"the image is {len(image)} bytes; the limit is {max_bytes}")
        return image, parse_params({**query, **fields})
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        params = parse_params(query)  # cheap: validate before reading the body
        return await _read_body(request, max_bytes), params
    raise UnsupportedImage(
        f"content type {ctype!r} is not accepted: send the image as the multipart field "
        "'image', or as the raw body with an image/* content type"
    )
