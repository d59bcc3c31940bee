"""HTTP routes: ``POST /segment`` and the operational endpoints."""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.access import AccessRecord
from service.app import Runtime, RuntimeDep
from service.batcher import Batcher, Completed
from service.budget import MemoryBudget, request_cost, upload_cost
from service.cache import digest, map_key, new_image_id, owner_of
from service.decode import FORMATS, Header, decode, read_header
from service.encode import Rendered, render
from service.errors import (
    BadRequest,
    ClientGone,
    Draining,
    ImageNotFound,
    ImageTooLarge,
    NotReady,
    ServiceError,
    Unauthorized,
    error_response,
)
from service.fetch import MAX_REDIRECTS, MAX_URL_LENGTH
from service.infer import Job, Segmented, finish
from service.params import SegmentParams
from service.upload import IMAGE_ID, MULTIPART_OVERHEAD, read_upload

__all__ = ["document_segment", "router"]

log = logging.getLogger("u2serve")
router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable, for programs"},
                "message": {"type": "string", "description": "what was wrong, for people"},
            },
        }
    },
}


def _error_doc(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": _ERROR_SCHEMA,
                "example": {"error": {"code": "...", "message": "what was wrong"}},
            }
        },
    }


_PARAMS_SCHEMA = SegmentParams.model_json_schema()
_IMAGE_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary", "minLength": 1}
_IMAGE_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9_-]{22}$",
    "description": "instead of the image: the X-Image-Id of an earlier answer, to ask for "
    "another answer for the same photo without uploading it again (the body empty, or "
    "form-encoded fields); 404 image_not_found when the service no longer has it",
}
_SEGMENT_DOC: dict[str, Any] = {
    "parameters": [
        *(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": prop.get("description", ""),
                "schema": {k: v for k, v in prop.items() if k != "description"},
            }
            for name, prop in _PARAMS_SCHEMA["properties"].items()
        ),
        {
            "name": IMAGE_ID,
            "in": "query",
            "required": False,
            "description": _IMAGE_ID_SCHEMA["description"],
            "schema": {k: v for k, v in _IMAGE_ID_SCHEMA.items() if k != "description"},
        },
    ],
    "requestBody": {
        "required": True,
        "description": "The image: a multipart field named `image` (parameters may then also "
        "be form fields, which take precedence over the query; each at most once in each "
        "place), or the raw body with an `image/*` or "
        "`application/octet-stream` content type. The bytes must be an image file in one of "
        "these formats, else 415: " + ", ".join(FORMATS) + ". Or no image: `image_id` (a "
        "query parameter with an empty body, or a field of a multipart or "
        "`application/x-www-form-urlencoded` body) names one sent before; the image and "
        "`image_id` together are a 422",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "additionalProperties": False,
                    "properties": {
                        "image": _IMAGE_SCHEMA,
                        IMAGE_ID: _IMAGE_ID_SCHEMA,
                        **_PARAMS_SCHEMA["properties"],
                    },
                }
            },
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_ID],
                    "additionalProperties": False,
                    "properties": {IMAGE_ID: _IMAGE_ID_SCHEMA, **_PARAMS_SCHEMA["properties"]},
                }
            },
            "image/*": {"schema": _IMAGE_SCHEMA},
            "application/octet-stream": {"schema": _IMAGE_SCHEMA},
        },
    },
}


_RECT = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("left", "top", "width", "height")},
    "required": ["left", "top", "width", "height"],
}
_BOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "output=box: the subject's box in the image's pixels (null when there is no "
    "foreground), its share of the pixels, the image's size, and with crop=true the crop "
    "rectangle (the whole image when there is no foreground)",
    "properties": {
        "image": {
            "type": "object",
            "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
        },
        "box": {"anyOf": [_RECT, {"type": "null"}]},
        "foreground_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "crop": _RECT,
    },
    "required": ["image", "box", "foreground_ratio"],
}
_BOX_HEADER_DOCS = [
    *(
        (f"X-Foreground-{side}", f"the subject's box: {what}, in the answer's pixels", "integer")
        for side, what in (
            ("Left", "first column"),
            ("Top", "first row"),
            ("Width", "columns (0: no foreground)"),
            ("Height", "rows (0: no foreground)"),
        )
    ),
    ("X-Foreground-Ratio", "foreground pixels / all pixels of the image, 0 to 1", "number"),
]


def document_segment(schema: dict[str, Any], *, models: Sequence[str], url_input: bool) -> None:
    """Add to ``POST /segment``'s document, in place, what depends on the settings: ``model``
    (an enum of the loaded models) and, where URL input is on, ``url`` and its errors (the
    form-encoded body then holds ``url`` or ``image_id``)."""
    path = schema["paths"]["/segment"]
    # FastAPI shares _SEGMENT_DOC's objects between apps: this app's changes go to a copy.
    path["post"] = op = copy.deepcopy(path["post"])
    model: dict[str, Any] = {
        "type": "string",
        "enum": list(models),
        "default": models[0],
        "description": "the network: one of the models this service has loaded (U2NET: "
        "full, most faithful; U2NETP: small and fast)",
    }
    url: dict[str, Any] = {
        "type": "string",
        "format": "uri",
        "maxLength": MAX_URL_LENGTH,
        "description": "fetch the image from this http(s) URL instead of sending it (the body "
        "is then empty, or form fields); private, loopback and link-local addresses are "
        f"refused (403), at most {MAX_REDIRECTS} redirects are followed",
    }
    extra: dict[str, dict[str, Any]] = {"model": model, **({"url": url} if url_input else {})}
    for name, prop in extra.items():
        op["parameters"].append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": prop["description"],
                "schema": {k: v for k, v in prop.items() if k != "description"},
            }
        )
    body = op["requestBody"]
    multipart = body["content"]["multipart/form-data"]["schema"]
    form = body["content"]["application/x-www-form-urlencoded"]["schema"]
    multipart["properties"].update(extra)
    form["properties"].update(extra)
    if not url_input:
        return
    body["required"] = False
    body["description"] += (
        ". Or no image at all but its `url`, as a query parameter (the body then empty) or a "
        "field of a multipart or `application/x-www-form-urlencoded` body. Exactly one of the "
        "image, `url` and `image_id`: two of them are a 422"
    )
    del multipart["required"]
    del form["required"]
    form["oneOf"] = [{"required": ["url"]}, {"required": [IMAGE_ID]}]
    responses = op["responses"]
    responses["400"]["description"] += ", or a `url` that is not an http(s) URL (invalid_url)"
    responses["403"] = _error_doc(
        "url_forbidden: the URL, or a redirect, leads to an address the service does not fetch "
        "from (loopback, private, link-local, …) unless U2SERVE_URL_ALLOW lists it"
    )
    responses["502"] = _error_doc(
        "fetch_failed: the URL's server could not be reached or resolved, answered an error "
        "(its status is in the message), or redirected too often"
    )
    responses["504"]["description"] += (
        ", or fetch_timeout: the URL's server did not connect, answer or finish in time"
    )


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _check_api_key(request: Request, expected: str) -> None:
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/segment",
    summary="Segment the salient object of an image",
    response_class=Response,
    responses={
        200: {
            "description": "A PNG, WebP or JPEG of the image's own size (or of the crop, scaled "
            "down to `max_side`): a one-channel mask or soft map, or a cut-out; with "
            "`output=box`, JSON. Headers on every answer: X-Request-ID, Server-Timing, and the "
            "subject's box in the answer's pixels (X-Foreground-Left, -Top, -Width, -Height; "
            "0, 0, 0, 0 when there is no foreground) with X-Foreground-Ratio, the share of the "
            "image's pixels that are foreground (0 to 1); X-Image-Id, to ask for another "
            "answer for the same photo without uploading it again.",
            "headers": {
                name: {"description": desc, "schema": {"type": kind}}
                for name, desc, kind in _BOX_HEADER_DOCS
            }
            | {
                "X-Image-Id": {
                    "description": "the photo's id, for image_id (absent when the upload could "
                    "not be kept)",
                    "schema": {"type": "string"},
                }
            },
            "content": {
                "image/png": {},
                "image/webp": {},
                "image/jpeg": {},
                "application/json": {
                    "schema": _BOX_SCHEMA,
                    "example": {
                        "image": {"width": 770, "height": 595},
                        "box": {"left": 92, "top": 126, "width": 632, "height": 393},
                        "foreground_ratio": 0.197606,
                        "crop": {"left": 60, "top": 106, "width": 696, "height": 433},
                    },
                },
            },
        },
        400: _error_doc(
            "Empty image, no `image` field (nor `url` or `image_id`), or a malformed multipart "
            "or form body"
        ),
        401: _error_doc("An API key is configured and the request has no valid one"),
        408: _error_doc("The request's headers or body did not arrive in time"),
        404: _error_doc(
            "image_not_found: the image_id is unknown, expired, evicted or another API key's; "
            "upload the image again"
        ),
        413: _error_doc(
            "Too many bytes, too many pixels (decompression bombs included), or an image that "
            "alone needs more than the memory budget"
        ),
        415: _error_doc("Not a decodable image, or an unsupported content type"),
        422: _error_doc(
            "A parameter is out of range, unknown, misspelt or given twice, or parameters that "
            "do not go together (e.g. format=jpeg without an opaque bg_color, or two of the "
            "image, url and image_id); the message names them"
        ),
        503: _error_doc(
            "The queue or the memory budget is full, too many connections, the model is "
            "warming up, or the service is draining; see Retry-After"
        ),
        504: _error_doc("The request waited in the queue past its deadline"),
    },
    openapi_extra=_SEGMENT_DOC,
)
async def segment(request: Request, rt: RuntimeDep) -> Response:
    start = time.monotonic()
    rid = _request_id(request)
    record = AccessRecord(rid, request.client.host if request.client else "-")
    rt.inflight += 1
    code: str | None = None
    timing: list[str] = []
    try:
        response = await _segment(request, rt, start, timing, record)
    except ServiceError as exc:
        response, code = exc.response(), exc.code
    except Exception:
        log.exception("request %s failed", rid)
        response = error_response(500, "internal_error", f"internal error (request {rid})")
        code = "internal_error"
    finally:
        rt.inflight -= 1
    elapsed = time.monotonic() - start
    timing.append(f"total;dur={elapsed * 1000:.1f}")
    response.headers["X-Request-ID"] = rid
    response.headers["Server-Timing"] = ", ".join(timing)
    if rt.draining or code == "request_timeout":
        response.headers["Connection"] = "close"
    output, model, source = (
        v if v != "-" else "unknown" for v in (record.output, record.model, record.source)
    )
    status = str(response.status_code)
    rt.metrics.requests.labels(model=model, source=source, output=output, status=status).inc()
    if response.status_code == 200:
        rt.metrics.request_duration.labels(model=model, output=output).observe(elapsed)
    for part in timing:
        stage, _, rest = part.partition(";dur=")
        record.stages_ms[stage] = float(rest.split(";")[0])
    record.emit(response.status_code, code, len(response.body))
    return response


async def _segment(
    request: Request, rt: Runtime, start: float, timing: list[str], record: AccessRecord
) -> Response:
    s = rt.settings
    if rt.draining:
        rt.metrics.rejected.labels(reason="draining").inc()
        raise Draining("the service is shutting down", headers={"Retry-After": "1"})
    if not rt.ready or rt.batcher is None or rt.codec_pool is None or rt.budget is None:
        rt.metrics.rejected.labels(reason="not_ready").inc()
        raise NotReady("the model is still loading", headers={"Retry-After": "1"})
    if s.api_key is not None:
        _check_api_key(request, s.api_key.get_secret_value())
    rt.batcher.check_capacity()  # refuse before spending work on the upload
    # The body is charged from its declared length before it is read, the pixels from the
    # image's header before they are decoded; both are held until the answer's bytes exist.
    limit = s.max_upload_bytes + MULTIPART_OVERHEAD
    with rt.budget.hold(upload_cost(request.headers.get("content-length"), limit)):
        return await _upload_to_answer(request, rt, rt.budget, start, timing, record)


async def _upload_to_answer(
    request: Request,
    rt: Runtime,
    budget: MemoryBudget,
    start: float,
    timing: list[str],
    record: AccessRecord,
) -> Response:
    s = rt.settings
    t = time.monotonic()
    try:
        got = await read_upload(
            request,
            s.max_upload_bytes,
            s.body_timeout_s,
            models=tuple(rt.models),
            url_input=rt.fetcher is not None,
        )
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    record.output = got.params.output
    record.model = model = got.model or s.default_model
    owner = owner_of(s.api_key.get_secret_value() if s.api_key else None)
    if got.image_id is not None:
        record.source = "image_id"
        kept = await _kept_upload(rt, got.image_id, owner)
        timing.append(f"upload;dur={(time.monotonic() - t) * 1000:.1f}")
        # Charged as the upload it stands for: a copy from Redis is as large.
        with budget.hold(len(kept)):
            return await _bytes_to_answer(
                request,
                rt,
                budget,
                kept,
                got.params,
                model,
                start,
                timing,
                record,
                owner=owner,
                image_id=got.image_id,
            )
    timing.append(f"upload;dur={(time.monotonic() - t) * 1000:.1f}")
    if got.url is None:
        if got.image is None:  # read_upload gives one of the three; this tells mypy
            raise BadRequest("no image")
        record.source = "upload"
        record.bytes_in = len(got.image)
        return await _bytes_to_answer(
            request, rt, budget, got.image, got.params, model, start, timing, record, owner=owner
        )
    record.source = "url"
    # Charged as an upload of undeclared length is: the most its body may be, twice.
    with budget.hold(upload_cost(None, s.max_upload_bytes)):
        data = await _fetch(rt, got.url, timing)
        record.bytes_in = len(data)
        # The fetched bytes are the upload: they get an image id and a map like any other.
        return await _bytes_to_answer(
            request, rt, budget, data, got.params, model, start, timing, record, owner=owner
        )


async def _fetch(rt: Runtime, url: str, timing: list[str]) -> bytes:
    """The image's bytes from ``url``, its header judged against the pixel limit as soon as
    it has arrived."""
    fetcher, pool = rt.fetcher, rt.codec_pool
    if fetcher is None or pool is None:  # checked by the callers; this tells mypy
        raise NotReady("the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    max_pixels = rt.settings.max_pixels

    async def probe(prefix: bytes) -> bool:
        try:
            await loop.run_in_executor(pool, partial(read_header, prefix, max_pixels=max_pixels))
        except ImageTooLarge:
            raise
        except ServiceError:
            return False  # not enough of the file yet, or no image: the whole body decides
        return True

    t = time.monotonic()
    try:
        fetched = await fetcher.fetch(url, max_bytes=rt.settings.max_upload_bytes, probe=probe)
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    fetch_s = time.monotonic() - t
    timing.append(f"fetch;dur={fetch_s * 1000:.1f}")
    rt.metrics.stage_duration.labels(stage="fetch").observe(fetch_s)
    return fetched.data


async def _bytes_to_answer(
    request: Request,
    rt: Runtime,
    budget: MemoryBudget,
    data: bytes,
    params: SegmentParams,
    model: str,
    start: float,
    timing: list[str],
    record: AccessRecord,
    *,
    owner: str,
    image_id: str | None = None,
) -> Response:
    """The answer for an image's bytes; a new upload (or a URL's bytes) is kept under a new
    image id, one given by ``image_id`` keeps its id."""
    s = rt.settings
    caches, pool = rt.caches, rt.codec_pool
    if caches is None or pool is None:  # checked by the caller; this tells mypy
        raise NotReady("the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    try:
        header, photo = await loop.run_in_executor(
            pool, partial(_inspect, data, max_pixels=s.max_pixels)
        )
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    record.size = (header.width, header.height)
    keeping = None
    if image_id is None:  # a new upload, kept under a new id while the answer is made
        image_id = new_image_id()
        keeping = asyncio.ensure_future(caches.uploads.put(image_id, owner, data))
    # The arrays of _decode_to_answer are gone when it returns, before the charge is released.
    cost = request_cost(
        header.width,
        header.height,
        alpha=header.alpha,
        cutout=params.output == "cutout",
        webp=params.format == "webp",
    )
    with budget.hold(cost):
        key = map_key(rt.models[model].segmenter.identity, photo)
        answer = await _decode_to_answer(
            request, rt, data, params, model, start, timing, record, key
        )
    headers = dict(answer.headers)
    if keeping is None or await keeping:  # an upload that could not be kept has no id
        headers["X-Image-Id"] = image_id
    return Response(answer.body, media_type=answer.media_type, headers=headers)


def _inspect(data: bytes, *, max_pixels: int) -> tuple[Header, str]:
    """The image's header (cheap, with decode's errors) and the bytes' digest, off the loop."""
    return read_header(data, max_pixels=max_pixels), digest(data)


async def _kept_upload(rt: Runtime, image_id: str, owner: str) -> bytes:
    """The bytes kept under an image id for this API key; 404 telling the client to upload
    again when there are none (unknown, expired, evicted, another key's, or Redis is down)."""
    if rt.caches is not None:
        data = await rt.caches.uploads.get(image_id, owner)
        if data is not None:
            rt.metrics.image_id_requests.labels(result="found").inc()
            return data
    rt.metrics.image_id_requests.labels(result="not_found").inc()
    rt.metrics.rejected.labels(reason=ImageNotFound.code).inc()
    raise ImageNotFound(
        f"no image with this id here: ids are kept for {rt.settings.cache_upload_ttl_s} s "
        "after their last use (fewer when the cache is full) and only for the API key that "
        "uploaded them; upload the image again"
    )


async def _decode_to_answer(
    request: Request,
    rt: Runtime,
    data: bytes,
    params: SegmentParams,
    model: str,
    start: float,
    timing: list[str],
    record: AccessRecord,
    key: str,
) -> Rendered:
    s = rt.settings
    served, pool, caches = rt.models[model], rt.codec_pool, rt.caches
    batcher, segmenter = served.batcher, served.segmenter
    if pool is None or caches is None:  # checked by the caller; this tells mypy
        raise NotReady("the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    lookup = asyncio.ensure_future(caches.maps.get(key))  # while the photo is decoded
    t = time.monotonic()
    try:
        image = await loop.run_in_executor(pool, lambda: decode(data, max_pixels=s.max_pixels))
    except ServiceError as exc:
        lookup.cancel()
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    decode_s = time.monotonic() - t
    timing.append(f"decode;dur={decode_s * 1000:.1f}")
    rt.metrics.stage_duration.labels(stage="decode").observe(decode_s)

    t = time.monotonic()
    cached = await lookup
    side = segmenter.spec.input_size
    rgb = torch.from_numpy(image.model_rgb)
    storing = None
    if cached is not None and len(cached) == side * side:
        # A hit: no queue and no network; the map's second half runs as a miss's does.
        record.cache = "hit"
        rt.metrics.map_cache_hits.labels(model=model).inc()
        timing.append(f'cache;dur={(time.monotonic() - t) * 1000:.1f};desc="hit"')
        t = time.monotonic()
        levels = torch.frombuffer(bytearray(cached), dtype=torch.uint8).view(side, side)
        infer_pool = rt.infer_pool
        result = await loop.run_in_executor(infer_pool, finish, segmenter, levels, rgb, params)
        timing.append(f"resize;dur={(time.monotonic() - t) * 1000:.1f}")
    else:
        record.cache = "miss"
        rt.metrics.map_cache_misses.labels(model=model).inc()
        timing.append(f'cache;dur={(time.monotonic() - t) * 1000:.1f};desc="miss"')
        done = await _infer(request, rt, batcher, Job(rgb, params), start)
        timing.append(f"queue;dur={done.queue_s * 1000:.1f}")
        timing.append(f'infer;dur={done.infer_s * 1000:.1f};desc="batch of {done.batch_size}"')
        record.batch_size = done.batch_size
        result = done.result.map
        storing = asyncio.ensure_future(caches.maps.put(key, done.result.levels.numpy().tobytes()))

    t = time.monotonic()
    levels_np: np.ndarray = result.numpy()
    answer = await loop.run_in_executor(pool, render, levels_np, image, params)
    encode_s = time.monotonic() - t
    timing.append(f"encode;dur={encode_s * 1000:.1f}")
    rt.metrics.stage_duration.labels(stage="encode").observe(encode_s)
    if storing is not None:  # kept before the answer, so that any replica may be asked next
        await storing
    return answer


async def _infer(
    request: Request, rt: Runtime, batcher: Batcher[Job, Segmented], job: Job, start: float
) -> Completed[Segmented]:
    """Through the queue and the network; withdrawn if the client goes away while queued."""
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        return await batcher.submit(
            job,
            start + rt.settings.request_timeout_s,
            cancelled=disconnected,  # type: ignore[arg-type]
        )
    except ClientGone:
        log.info("client went away while queued")
        raise
    finally:
        disconnected.cancel()


@router.get("/livez", summary="Liveness: the process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every model's weights are loaded and warmed up, 503 before "
    "and while draining",
    responses={503: _error_doc("Not ready yet, or draining")},
)
async def readyz(rt: RuntimeDep) -> Response:
    if rt.draining:
        return error_response(503, "draining", "the service is shutting down")
    if not rt.ready or rt.segmenter is None:
        return error_response(503, "not_ready", "the model is loading or warming up")
    models = [
        {
            "model": name,
            "engine": m.segmenter.engine.name,
            "device": str(m.segmenter.device),
            "dtype": str(m.segmenter.dtype).removeprefix("torch."),
            "max_batch_size": m.batcher.max_batch_size,
            "precision": m.segmenter.precision,
        }
        for name, m in rt.models.items()
    ]
    # The default model's fields at the top, as before there were several; all in "models".
    return JSONResponse({"status": "ready", **models[0], "models": models})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(rt: RuntimeDep) -> Response:
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
