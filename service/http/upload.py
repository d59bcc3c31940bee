"""Reading the request: the image (multipart field ``image``, a raw image body, a ``url`` to
fetch it from, or the ``image_id`` of one uploaded before; exactly one of them) and the parameters
(query string or form fields), within the byte limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar
from urllib.parse import parse_qsl

from starlette.requests import Request

from service.core.cache import valid_image_id
from service.core.request import Submission
from service.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidParameter,
    RequestTimeout,
    UnsupportedImage,
)
from service.http.multipart import MalformedMultipart, boundary_of, parse_multipart
from service.params import parse_params

__all__ = ["IMAGE_ID", "MULTIPART_OVERHEAD", "Form", "read_form", "read_upload"]

IMAGE_ID = "image_id"

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and the small parameter fields
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
# The image and every parameter once (SegmentParams' fields, url, model, image_id), and no more.
_MAX_PARTS = 24
# A body past this size is parsed in the codec pool rather than on the event loop (a 20 MB
# image as base64 in a form or JSON body takes tens of milliseconds to parse).
_OFF_LOOP_BYTES = 1 << 20
_T = TypeVar("_T")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` seconds (408 after that).

    A body over the limit is answered 413 without reading the rest: the server reads and
    drops what still comes on that connection, so the client gets the answer rather than a
    reset (and a client that sent ``Expect: 100-continue`` is never asked for the body).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(f"the request is {declared} bytes; the limit is {limit}")
    # The chunks are joined once at the end: one copy of the body, where a growing buffer
    # copied it again each time it grew and once more into bytes. Those copies were the larger
    # part of the event loop's time for a 12 MP upload (bench/README.md, section 11).
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                if not chunk:
                    continue  # the stream's closing empty chunk
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise ImageTooLarge(f"the request is over the limit of {limit} bytes")
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s "
            f"({size} bytes came); send it faster or in one go"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _once(items: list[tuple[str, str]]) -> dict[str, str]:
    """Parameters by name; one given twice in the same place (the query, or the form) is
    refused rather than one of its values silently chosen."""
    values: dict[str, str] = {}
    for key, value in items:
        if key in values:
            raise InvalidParameter(f"{key}: given more than once")
        values[key] = value
    return values


def _submission(
    given: dict[str, str],
    image: bytes | None,
    *,
    models: Sequence[str],
    url_input: bool,
) -> Submission:
    """Validate the parameters; ``url``, ``image_id`` and ``model`` choose the source and the
    network, the rest are :class:`SegmentParams`."""
    values = dict(given)
    url, model = values.pop("url", None), values.pop("model", None)
    image_id = values.pop(IMAGE_ID, None)
    if url is not None and not url_input:
        raise InvalidParameter("url: this service does not fetch images by URL")
    if image_id is not None and not valid_image_id(image_id):
        raise InvalidParameter(
            "image_id: not an image id; give the X-Image-Id of an earlier answer, or the image"
        )
    if model is not None and model not in models:
        loaded = ", ".join(models) or "none"
        raise InvalidParameter(f"model: {model!r} is not loaded; this service has {loaded}")
    params = parse_params(values)
    given_as = (("image", image), ("url", url), (IMAGE_ID, image_id))
    sources = [name for name, value in given_as if value is not None]
    if len(sources) > 1:
        raise _together(sources, url_input)
    return Submission(params, image, url, model, image_id)


def _together(sources: Sequence[str], url_input: bool) -> InvalidParameter:
    """An image, its URL and an image id are three ways to say the same thing: one only."""
    ways = (
        "the image, its url or the image_id of one sent before"
        if url_input
        else "the image or the image_id of one sent before"
    )
    return InvalidParameter(f"{', '.join(sources)}: give one of {ways}, not several")


async def read_upload(
    request: Request,
    max_bytes: int,
    timeout_s: float = 60.0,
    *,
    models: Sequence[str] = (),
    url_input: bool = False,
) -> Submission:
    """The image bytes, URL or image id, and the validated parameters; 400/408/413/415/422
    otherwise.

    ``models``: the names ``model`` may take; ``url_input``: whether ``url`` is accepted.
    """
    query = request.query_params.multi_items()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    check = partial(_submission, models=models, url_input=url_input)
    also = " (or 'url', or 'image_id')" if url_input else " (or 'image_id')"
    if ctype == "multipart/form-data":
        body = await _read_body(request, max_bytes + MULTIPART_OVERHEAD, timeout_s)
        fields: list[tuple[str, str]] = []
        image: bytes | None = None
        try:
            parts = parse_multipart(
                body, boundary_of(request.headers["content-type"]), max_parts=_MAX_PARTS
            )
        except MalformedMultipart as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        for part in parts:
            if part.filename is not None and part.name != "image":
                raise InvalidParameter(f"{part.name}: unexpected file field (send 'image')")
            if part.name == "image":
                if image is not None:
                    raise BadRequest("malformed multipart body: more than one 'image' part")
                image = part.data
            else:
                # As browsers send them: UTF-8, or else Latin-1, as Starlette decodes them.
                try:
                    fields.append((part.name, part.data.decode("utf-8")))
                except UnicodeDecodeError:
                    fields.append((part.name, part.data.decode("latin-1")))
        # A form field takes precedence over the query parameter of the same name, but a bad
        # query parameter is refused all the same.
        given = _once(query)
        check(given, None)
        submission = check(given | _once(fields), image)
        if image is None and submission.url is None and submission.image_id is None:
            raise BadRequest(f"the multipart body has no field named 'image'{also}")
        if image is not None and len(image) > max_bytes:
            raise ImageTooLarge(f"the image is {len(image)} bytes; the limit is {max_bytes}")
        return submission
    if ctype == _FORM:
        # Fields only (a url or an image id, and parameters): small.
        body = await _read_body(request, MULTIPART_OVERHEAD, timeout_s)
        try:
            fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"malformed form body: {exc}") from exc
        given = _once(query)
        check(given, None)
        submission = check(given | _once(fields), None)
        if submission.url is None and submission.image_id is None:
            wanted = "'url' or 'image_id'" if url_input else "'image_id'"
            raise BadRequest(f"a form-encoded body must hold the field {wanted}")
        return submission
    # Cheap: validate before reading the body.
    submission = check(_once(query), None)
    raw = ctype.startswith("image/") or ctype in ("application/octet-stream", "")
    by_reference = submission.url is not None or submission.image_id is not None
    if not (raw or by_reference):
        raise _unsupported(ctype)
    data = await _read_body(request, max_bytes, timeout_s)
    if not by_reference:
        return replace(submission, image=data)
    if data:
        raise _together(["image", "url" if submission.url is not None else IMAGE_ID], url_input)
    return submission


def _unsupported(ctype: str) -> UnsupportedImage:
    return UnsupportedImage(
        f"content type {ctype!r} is not accepted: send the image as the multipart field "
        "'image', or as the raw body with an image/* content type (or give a url or an "
        "image_id)"
    )


@dataclass(frozen=True)
class Form:
    """What a request of another API (:mod:`service.http.compat`) carries: its named values, from
    the
    query string and the body's fields, each name once in all (as text; a JSON body's values as
    JSON gives them, ``typed``); and its file parts by field name."""

    fields: dict[str, object]
    files: dict[str, bytes]
    typed: bool = False


async def _parsed(pool: Executor | None, body: bytes, parse: Callable[[bytes], _T]) -> _T:
    if pool is None or len(body) < _OFF_LOOP_BYTES:
        return parse(body)
    return await asyncio.get_running_loop().run_in_executor(pool, parse, body)


def _text(data: bytes) -> str:
    # As browsers send them: UTF-8, or else Latin-1, as Starlette decodes them.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _form_fields(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"malformed form body: {exc}") from exc


def _json_fields(body: bytes) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("a JSON body must be an object of parameters")
    return doc


async def read_form(
    request: Request,
    max_bytes: int,
    timeout_s: float,
    *,
    files: Collection[str] = (),
    json_body: bool = False,
    pool: Executor | None = None,
) -> Form:
    """The query's and the body's fields (a multipart or form-encoded body, or a JSON object
    where ``json_body``), and the multipart parts named in ``files``, within ``max_bytes``;
    400/408/413/415/422 otherwise. A name given twice, in one place or in both, is refused; so is
    a file part under another name. ``pool``: where a large body is parsed."""
    items: list[tuple[str, object]] = list(request.query_params.multi_items())
    parts: dict[str, bytes] = {}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    typed = False
    if ctype == "multipart/form-data":
        body = await _read_body(request, max_bytes, timeout_s)
        try:
            boundary = boundary_of(request.headers["content-type"])
            parsed = await _parsed(
                pool, body, partial(parse_multipart, boundary=boundary, max_parts=32)
            )
        except MalformedMultipart as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        for part in parsed:
            if part.name in files:
                if part.name in parts:
                    raise InvalidParameter(f"{part.name}: given more than once")
                parts[part.name] = part.data
            elif part.filename is not None:
                wanted = " or ".join(f"'{f}'" for f in files) or "none"
                raise InvalidParameter(
                    f"{part.name}: unexpected file field (file fields: {wanted})"
                )
            else:
                items.append((part.name, _text(part.data)))
    elif ctype == _FORM:
        items += await _parsed(pool, await _read_body(request, max_bytes, timeout_s), _form_fields)
    elif ctype == _JSON and json_body:
        body = await _read_body(request, max_bytes, timeout_s)
        doc = await _parsed(pool, body, _json_fields)
        typed = True
        items += list(doc.items())
    else:
        body = await _read_body(request, MULTIPART_OVERHEAD, timeout_s)
        if body:
            accepted = ["multipart/form-data", _FORM] + ([_JSON] if json_body else [])
            raise UnsupportedImage(
                f"content type {ctype!r} is not accepted here: send {', '.join(accepted)}"
            )
    fields: dict[str, object] = {}
    for key, value in items:
        if key in fields or key in parts:
            raise InvalidParameter(f"{key}: given more than once")
        fields[key] = value
    return Form(fields, parts, typed)
