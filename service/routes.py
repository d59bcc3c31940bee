"""HTTP routes: ``POST /segment`` and the operational endpoints."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from functools import partial
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.access import AccessRecord
from service.app import Runtime, RuntimeDep
from service.budget import MemoryBudget, request_cost, upload_cost
from service.decode import FORMATS, decode, read_header
from service.encode import Rendered, render
from service.errors import (
    ClientGone,
    Draining,
    NotReady,
    ServiceError,
    Unauthorized,
    error_response,
)
from service.infer import Job
from service.params import SegmentParams
from service.upload import MULTIPART_OVERHEAD, read_upload

__all__ = ["router"]

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
_SEGMENT_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": prop.get("description", ""),
            "schema": {k: v for k, v in prop.items() if k != "description"},
        }
        for name, prop in _PARAMS_SCHEMA["properties"].items()
    ],
    "requestBody": {
        "required": True,
        "description": "The image: a multipart field named `image` (parameters may then also "
        "be form fields, which take precedence over the query; each at most once in each "
        "place), or the raw body with an `image/*` or "
        "`application/octet-stream` content type. The bytes must be an image file in one of "
        "these formats, else 415: " + ", ".join(FORMATS),
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "additionalProperties": False,
                    "properties": {
                        "image": _IMAGE_SCHEMA,
                        **_PARAMS_SCHEMA["properties"],
                    },
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
            "image's pixels that are foreground (0 to 1).",
            "headers": {
                name: {"description": desc, "schema": {"type": kind}}
                for name, desc, kind in _BOX_HEADER_DOCS
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
        400: _error_doc("Empty image, no `image` field, or a malformed multipart body"),
        401: _error_doc("An API key is configured and the request has no valid one"),
        408: _error_doc("The request's headers or body did not arrive in time"),
        413: _error_doc(
            "Too many bytes, too many pixels (decompression bombs included), or an image that "
            "alone needs more than the memory budget"
        ),
        415: _error_doc("Not a decodable image, or an unsupported content type"),
        422: _error_doc(
            "A parameter is out of range, unknown, misspelt or given twice, or parameters that "
            "do not go together (e.g. format=jpeg without an opaque bg_color); the message "
            "names them"
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
    output = record.output if record.output != "-" else "unknown"
    rt.metrics.requests.labels(output=output, status=str(response.status_code)).inc()
    if response.status_code == 200:
        rt.metrics.request_duration.labels(output=output).observe(elapsed)
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
        data, params = await read_upload(request, s.max_upload_bytes, s.body_timeout_s)
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    timing.append(f"upload;dur={(time.monotonic() - t) * 1000:.1f}")
    record.bytes_in = len(data)
    record.output = params.output
    loop = asyncio.get_running_loop()
    try:
        header = await loop.run_in_executor(
            rt.codec_pool, partial(read_header, data, max_pixels=s.max_pixels)
        )
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    record.size = (header.width, header.height)
    # The arrays of _decode_to_answer are gone when it returns, before the charge is released.
    cost = request_cost(
        header.width, header.height, alpha=header.alpha, cutout=params.output == "cutout"
    )
    with budget.hold(cost):
        answer = await _decode_to_answer(request, rt, data, params, start, timing, record)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)


async def _decode_to_answer(
    request: Request,
    rt: Runtime,
    data: bytes,
    params: SegmentParams,
    start: float,
    timing: list[str],
    record: AccessRecord,
) -> Rendered:
    s = rt.settings
    batcher, pool = rt.batcher, rt.codec_pool
    if batcher is None or pool is None:  # checked by the caller; this tells mypy
        raise NotReady("the model is still loading", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    t = time.monotonic()
    try:
        image = await loop.run_in_executor(pool, lambda: decode(data, max_pixels=s.max_pixels))
    except ServiceError as exc:
        rt.metrics.rejected.labels(reason=exc.code).inc()
        raise
    decode_s = time.monotonic() - t
    timing.append(f"decode;dur={decode_s * 1000:.1f}")
    rt.metrics.stage_duration.labels(stage="decode").observe(decode_s)

    job = Job(torch.from_numpy(image.model_rgb), params)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done = await batcher.submit(
            job,
            start + s.request_timeout_s,
            cancelled=disconnected,  # type: ignore[arg-type]
        )
    except ClientGone:
        log.info("client went away while queued")
        raise
    finally:
        disconnected.cancel()
    timing.append(f"queue;dur={done.queue_s * 1000:.1f}")
    timing.append(f'infer;dur={done.infer_s * 1000:.1f};desc="batch of {done.batch_size}"')
    record.batch_size = done.batch_size

    t = time.monotonic()
    levels: np.ndarray = done.result.numpy()
    answer = await loop.run_in_executor(pool, render, levels, image, params)
    encode_s = time.monotonic() - t
    timing.append(f"encode;dur={encode_s * 1000:.1f}")
    rt.metrics.stage_duration.labels(stage="encode").observe(encode_s)
    return answer


@router.get("/livez", summary="Liveness: the process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once the weights are loaded and warmed up, 503 before and while "
    "draining",
    responses={503: _error_doc("Not ready yet, or draining")},
)
async def readyz(rt: RuntimeDep) -> Response:
    if rt.draining:
        return error_response(503, "draining", "the service is shutting down")
    if not rt.ready or rt.segmenter is None:
        return error_response(503, "not_ready", "the model is loading or warming up")
    seg = rt.segmenter
    return JSONResponse(
        {
            "status": "ready",
            "model": seg.name,
            "engine": seg.engine.name,
            "device": str(seg.device),
            "dtype": str(seg.dtype).removeprefix("torch."),
            "precision": seg.precision,
        }
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(rt: RuntimeDep) -> Response:
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
