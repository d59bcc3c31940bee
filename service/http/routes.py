"""HTTP routes: ``POST /segment``, the APIs other tools speak (remove.bg's and rembg's, translated
by :mod:`service.http.compat`), and the operational endpoints."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, NotRequired

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field
from typing_extensions import TypedDict  # pydantic describes typing's only from Python 3.12

from service.core.access import AccessRecord
from service.core.budget import upload_cost
from service.core.cache import owner_of
from service.core.pipeline import Pipeline, RequestContext, Stage
from service.core.request import Submission
from service.errors import ClientGone, ServiceError, Unauthorized
from service.http.api import Api, Call, Reading
from service.http.compat import operations as compat_operations
from service.http.compat import rembg, removebg
from service.http.errors import error_response, response_of
from service.http.runtime import Runtime, RuntimeDep
from service.http.schema import (
    Answer,
    Body,
    Errors,
    Fields,
    Media,
    Offer,
    Operation,
    Url,
    choice,
    param,
    params,
    responses,
    schema_of,
)
from service.http.upload import IMAGE_ID, MULTIPART_OVERHEAD, read_upload
from service.images.decode import FORMATS
from service.params import SegmentParams
from service.settings import Settings
from service.url.fetch import MAX_REDIRECTS

__all__ = ["DIRECT", "SEGMENT", "operations", "router", "serve"]

log = logging.getLogger("u2serve")
router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# -- POST /segment's document (service/http/schema.py writes it) --------------------------------


class _Problem(TypedDict):
    code: Annotated[str, Field(description="stable, for programs")]
    message: Annotated[str, Field(description="what was wrong, for people")]


# The service's error answer, as service.http.errors.error_response writes it.
class _ErrorBody(TypedDict):
    error: _Problem


_ERRORS = Errors(
    schema_of(_ErrorBody), example={"error": {"code": "...", "message": "what was wrong"}}
)


class _Rect(TypedDict):
    left: int
    top: int
    width: int
    height: int


class _Size(TypedDict):
    width: int
    height: int


# What service.images.encode.render writes for output=box.
class _BoxAnswer(TypedDict):
    image: _Size
    box: _Rect | None
    foreground_ratio: Annotated[float, Field(ge=0, le=1)]
    crop: NotRequired[_Rect]


_BOX = Annotated[
    _BoxAnswer,
    Field(
        description="output=box: the subject's box in the image's pixels (null when there is no "
        "foreground), its share of the pixels, the image's size, and with crop=true the crop "
        "rectangle (the whole image when there is no foreground)"
    ),
]

_BOX_EXAMPLE = {
    "image": {"width": 770, "height": 595},
    "box": {"left": 92, "top": 126, "width": 632, "height": 393},
    "foreground_ratio": 0.197606,
    "crop": {"left": 60, "top": 106, "width": 696, "height": 433},
}
_ANSWER_HEADERS = [
    *(
        param(f"X-Foreground-{side}", int, f"the subject's box: {what}, in the answer's pixels")
        for side, what in (
            ("Left", "first column"),
            ("Top", "first row"),
            ("Width", "columns (0: no foreground)"),
            ("Height", "rows (0: no foreground)"),
        )
    ),
    param("X-Foreground-Ratio", float, "foreground pixels / all pixels of the image, 0 to 1"),
    param(
        "X-Image-Id",
        str,
        "the photo's id, for image_id (absent when the upload could not be kept)",
    ),
]
_IMAGE = param("image", Annotated[bytes, Field(min_length=1)])
_IMAGE_ID = param(
    IMAGE_ID,
    Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{22}$")],  # as service.core.cache checks it
    "instead of the image: the X-Image-Id of an earlier answer, to ask for another answer for "
    "the same photo without uploading it again (the body empty, or form-encoded fields); 404 "
    "image_not_found when the service no longer has it",
)
_MODEL = param(
    "model",
    str,
    "the network: one of the models this service has loaded (U2NET: full, most faithful; "
    "U2NETP: small and fast)",
)
_URL = param(
    "url",
    Url,
    "fetch the image from this http(s) URL instead of sending it (the body is then empty, or "
    "form fields); private, loopback and link-local addresses are refused (403), at most "
    f"{MAX_REDIRECTS} redirects are followed",
)
_BODY = (
    "The image: a multipart field named `image` (parameters may then also be form fields, "
    "which take precedence over the query; each at most once in each place), or the raw body "
    "with an `image/*` or `application/octet-stream` content type. The bytes must be an image "
    "file in one of these formats, else 415: " + ", ".join(FORMATS) + ". Or no image: "
    "`image_id` (a query parameter with an empty body, or a field of a multipart or "
    "`application/x-www-form-urlencoded` body) names one sent before; the image and `image_id` "
    "together are a 422"
)
_BODY_BY_URL = (
    ". Or no image at all but its `url`, as a query parameter (the body then empty) or a field "
    "of a multipart or `application/x-www-form-urlencoded` body. Exactly one of the image, "
    "`url` and `image_id`: two of them are a 422"
)


def _segment_operation(offer: Offer) -> Operation:
    """``POST /segment`` as ``offer`` serves it: ``model`` one of the loaded models, and with
    URL input ``url`` and its errors (a form-encoded body then holds ``url`` or ``image_id``)."""
    by_url = offer.url_input
    sources = [_IMAGE_ID, choice(_MODEL, offer.models), *([_URL] if by_url else [])]
    fields = params(SegmentParams)
    image = Media(_IMAGE.schema)
    answers = {
        200: Answer(
            "A PNG, WebP or JPEG of the image's own size (or of the crop, scaled down to "
            "`max_side`): a one-channel mask or soft map, or a cut-out; with `output=box`, JSON. "
            "Headers on every answer: X-Request-ID, Server-Timing, and the subject's box in the "
            "answer's pixels (X-Foreground-Left, -Top, -Width, -Height; 0, 0, 0, 0 when there is "
            "no foreground) with X-Foreground-Ratio, the share of the image's pixels that are "
            "foreground (0 to 1); X-Image-Id, to ask for another answer for the same photo "
            "without uploading it again.",
            {
                "image/png": Media(),
                "image/webp": Media(),
                "image/jpeg": Media(),
                "application/json": Media(schema_of(_BOX), _BOX_EXAMPLE),
            },
            _ANSWER_HEADERS,
        ),
        400: _ERRORS(
            "Empty image, no `image` field (nor `url` or `image_id`), or a malformed multipart "
            "or form body"
            + (", or a `url` that is not an http(s) URL (invalid_url)" if by_url else "")
        ),
        401: _ERRORS("An API key is configured and the request has no valid one"),
        404: _ERRORS(
            "image_not_found: the image_id is unknown, expired, evicted or another API key's; "
            "upload the image again"
        ),
        408: _ERRORS("The request's headers or body did not arrive in time"),
        413: _ERRORS(
            "Too many bytes, too many pixels (decompression bombs included), or an image that "
            "alone needs more than the memory budget"
        ),
        415: _ERRORS("Not a decodable image, or an unsupported content type"),
        422: _ERRORS(
            "A parameter is out of range, unknown, misspelt or given twice, or parameters that "
            "do not go together (e.g. format=jpeg without an opaque bg_color, or two of the "
            "image, url and image_id); the message names them"
        ),
        503: _ERRORS(
            "The queue or the memory budget is full, too many connections, the model is "
            "warming up, or the service is draining; see Retry-After"
        ),
        504: _ERRORS(
            "The request waited in the queue past its deadline"
            + (
                ", or fetch_timeout: the URL's server did not connect, answer or finish in time"
                if by_url
                else ""
            )
        ),
    }
    if by_url:
        answers[403] = _ERRORS(
            "url_forbidden: the URL, or a redirect, leads to an address the service does not "
            "fetch from (loopback, private, link-local, …) unless U2SERVE_URL_ALLOW lists it"
        )
        answers[502] = _ERRORS(
            "fetch_failed: the URL's server could not be reached or resolved, answered an error "
            "(its status is in the message), or redirected too often"
        )
    return Operation(
        "post",
        "/segment",
        # FastAPI's id for the route, kept: clients generated from the document are named by it.
        "segment_segment_post",
        "Segment the salient object of an image",
        answers,
        query=[*fields, *sources],
        body=Body(
            {
                "multipart/form-data": Fields(
                    [_IMAGE, _IMAGE_ID, *fields, *sources[1:]],
                    required=() if by_url else ("image",),
                ),
                "application/x-www-form-urlencoded": Fields(
                    [_IMAGE_ID, *fields, *sources[1:]],
                    one_of=("url", IMAGE_ID) if by_url else (IMAGE_ID,),
                ),
                "image/*": image,
                "application/octet-stream": image,
            },
            _BODY + (_BODY_BY_URL if by_url else ""),
            required=not by_url,
        ),
    )


def operations(offer: Offer) -> list[Operation]:
    """The document of the routes below that FastAPI leaves out (``include_in_schema=False``):
    what they take follows the settings."""
    return [_segment_operation(offer), *compat_operations(offer)]


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _check_api_key(request: Request, expected: str) -> None:
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(
            "a valid API key is required (Authorization: Bearer <key>, or X-API-Key: <key>)"
        )


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/segment", include_in_schema=False)  # documented by operations()
async def segment(request: Request, rt: RuntimeDep) -> Response:
    return await serve(request, rt, SEGMENT)


@dataclass(frozen=True)
class _SegmentCall:
    submission: Submission

    async def answer(self, pipeline: Pipeline, ctx: RequestContext) -> Response:
        answer = await pipeline.answer(self.submission, ctx)
        return Response(answer.body, media_type=answer.media_type, headers=answer.headers)


class _Segment:
    """``POST /segment``: the service's own API (:mod:`service.http.upload` reads it)."""

    name = "segment"

    def body_limit(self, settings: Settings) -> int:
        return settings.max_upload_bytes + MULTIPART_OVERHEAD

    async def read(self, request: Request, reading: Reading) -> Call:
        return _SegmentCall(
            await read_upload(
                request,
                reading.max_bytes,
                reading.timeout_s,
                models=reading.models,
                url_input=reading.url_input,
            )
        )

    def error(self, exc: ServiceError) -> Response:
        return response_of(exc)


SEGMENT: Api = _Segment()


async def serve(request: Request, rt: Runtime, api: Api) -> Response:
    """One request of ``api``, whichever it is: read, answered through the pipeline, and
    accounted for alike (in flight, the access log, the metrics under its ``api`` label); every
    error in the API's own shape, an unexpected one a plain 500 that leaks nothing."""
    ctx = RequestContext(
        AccessRecord(
            _request_id(request), request.client.host if request.client else "-", api=api.name
        ),
        time.monotonic(),
    )
    rid = ctx.record.request_id
    rt.metrics.in_flight.inc()
    code: str | None = None
    try:
        response = await _serve(request, rt, api, ctx)
    except ServiceError as exc:
        response, code = api.error(exc), exc.code
    except Exception:
        log.exception("request %s failed", rid)
        response = api.error(ServiceError(f"internal error (request {rid})"))
        code = "internal_error"
    finally:
        rt.metrics.in_flight.dec()
    elapsed = ctx.stage("total", ctx.start)
    response.headers["X-Request-ID"] = rid
    response.headers["Server-Timing"] = _server_timing(ctx.stages)
    if rt.draining or code == "request_timeout":
        response.headers["Connection"] = "close"
    record = ctx.record
    output, model, source = (
        v if v != "-" else "unknown" for v in (record.output, record.model, record.source)
    )
    status = str(response.status_code)
    rt.metrics.requests.labels(
        api=api.name, model=model, source=source, output=output, status=status
    ).inc()
    if response.status_code == 200:
        rt.metrics.request_duration.labels(api=api.name, model=model, output=output).observe(
            elapsed
        )
    for stage in ctx.stages:  # the milliseconds as Server-Timing shows them
        record.stages_ms[stage.name] = round(stage.seconds * 1000, 1)
    record.emit(response.status_code, code, len(response.body))
    return response


def _server_timing(stages: Iterable[Stage]) -> str:
    """The ``Server-Timing`` header of a request's stages: ``name;dur=<ms, to 0.1>``, with
    ``;desc="…"`` where the stage has a description."""
    return ", ".join(
        f"{stage.name};dur={stage.seconds * 1000:.1f}"
        + (f';desc="{stage.description}"' if stage.description is not None else "")
        for stage in stages
    )


async def _serve(request: Request, rt: Runtime, api: Api, ctx: RequestContext) -> Response:
    """Admit the request, read it into a call, and have the call answer it; in flight for the
    core's drain from the moment it takes work."""
    core = rt.serving()
    with core.counted():
        pipeline = core.pipeline
        s = rt.settings
        if s.api_key is not None:
            _check_api_key(request, s.api_key.get_secret_value())
            ctx.owner = owner_of(s.api_key.get_secret_value())
        else:
            ctx.owner = owner_of(None)
        pipeline.admit()  # refuse before spending work on the upload
        try:
            return await _admitted(request, rt, api, ctx, pipeline)
        finally:
            pipeline.release()


async def _admitted(
    request: Request, rt: Runtime, api: Api, ctx: RequestContext, pipeline: Pipeline
) -> Response:
    """An admitted request: its body read into a call, and the call's answer."""
    s = rt.settings
    # The body is charged from its declared length before it is read, the pixels from the
    # image's header before they are decoded; both are held until the answer's bytes exist.
    limit = api.body_limit(s)
    with pipeline.parts.budget.hold(upload_cost(request.headers.get("content-length"), limit)):
        ctx.received = time.monotonic()
        reading = Reading(
            s.max_upload_bytes,
            s.body_timeout_s,
            tuple(pipeline.parts.models),
            rt.fetcher is not None,
            pipeline.parts.codec_pool,
        )
        try:
            call = await api.read(request, reading)
        except ServiceError as exc:
            pipeline.reject(exc)
            raise
        # Once the body is read, the next message the server gives is the client leaving.
        disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
        ctx.disconnected = disconnected
        try:
            return await call.answer(pipeline, ctx)
        except ClientGone:
            log.info("client went away while queued")
            raise
        finally:
            disconnected.cancel()


# -- the APIs other tools speak (service/http/compat/) --------------------------------------------


# Their document is written by removebg.operations() and rembg.operations() (see operations()).
@router.post("/v1.0/removebg", include_in_schema=False)
async def removebg_remove(request: Request, rt: RuntimeDep) -> Response:
    return await serve(request, rt, removebg.API)


@router.get("/v1.0/account", include_in_schema=False)
async def removebg_account(request: Request, rt: RuntimeDep) -> Response:
    if rt.settings.api_key is not None:
        try:
            _check_api_key(request, rt.settings.api_key.get_secret_value())
        except ServiceError as exc:
            return removebg.error(exc)
    return removebg.account()


# One route for both methods, so that a 405 lists both in Allow (FastAPI would give its two
# operations one id; its document has one for each).
@router.api_route("/api/remove", methods=["GET", "POST"], include_in_schema=False)
async def rembg_remove(request: Request, rt: RuntimeDep) -> Response:
    return await serve(
        request, rt, rembg.FROM_URL if request.method == "GET" else rembg.FROM_UPLOAD
    )


# The endpoints every image goes through, called by service.http.app.App straight from the server.
DIRECT = (segment, removebg_remove, rembg_remove)


@router.get("/livez", summary="Liveness: the process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every model's weights are loaded and warmed up, 503 before "
    "and while draining",
    responses=responses({503: _ERRORS("Not ready yet, or draining")}),
)
async def readyz(rt: RuntimeDep) -> Response:
    if rt.draining:
        return error_response(503, "draining", "the service is shutting down")
    if not rt.is_ready or not rt.worker_ready:
        return error_response(503, "not_ready", "the model is loading or warming up")
    models = [m.info for m in rt.models.values()]
    # The default model's fields at the top, as before there were several; all in "models".
    return JSONResponse({"status": "ready", **models[0], "models": models})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(rt: RuntimeDep) -> Response:
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
