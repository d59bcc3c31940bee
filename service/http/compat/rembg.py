"""rembg's server (``rembg s``, 2.0.86), as it answers: ``POST /api/remove`` with the image as
the multipart field ``file``, and ``GET /api/remove?url=`` for an image the service fetches (its
own URL fetcher, with its checks). The answer is a PNG, by default the cut-out.

Its parameters, from the query or the form (rembg reads some from one, some from the other; each
once), translated into :class:`~service.params.SegmentParams`:

- ``om`` (only mask): ``output=probability``, the soft map, as rembg's mask is; with ``ppm``
  (post-process mask, which rembg thresholds to 0/255) ``output=mask``. Without ``om``, the
  cut-out (``output=cutout``) with the soft map as its alpha (``alpha=soft``), as rembg's is
  (with the subject's own colour where alpha is partial, where rembg keeps the photo's); ``ppm``
  changes nothing there.
- ``bgc`` (``r,g,b`` or ``r,g,b,a``, 0–255): ``bg_color`` on the cut-out; with ``om`` it is a 422
  (rembg ignores it).
- ``model``: one of the loaded models (the default one if none: rembg's own default,
  ``bria-rmbg``, is no model of this service).
- ``a`` (alpha matting): on the cut-out, the service's matte (``alpha=matte``: alpha solved from
  the photo in a band the map's own uncertainty finds, and the subject's own colour there), which
  does what rembg's matting is for; with ``om``, the service's edge refinement of the map
  (``refine=true``). Neither takes rembg's trimap: its ``af``, ``ab`` and ``ae`` are accepted at
  rembg's defaults (240, 10, 10), which change nothing, and any other value is a 400.
- ``dc`` (decontaminate), ``vm`` (ViTMatte) and ``extras`` (JSON options for rembg's model): the
  service has no such thing, so true (or non-empty) is a 400.

Errors are FastAPI's shape, as rembg's are: ``{"detail": "...", "code": "..."}``; a value that is
not valid is 422 and a URL that is refused 400, as rembg answers them; a parameter that cannot
be honoured is 400. Anything rembg has no answer for keeps the service's status (a non-image is
415, where rembg fails with a 500).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from typing_extensions import TypedDict  # pydantic describes typing's only from Python 3.12

from service.core.request import Submission
from service.errors import ImageTooLarge, InvalidParameter, ServiceError, UnsupportedParameter
from service.http.api import Call, Reading
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
    schema_of,
)
from service.http.upload import MULTIPART_OVERHEAD, Form, read_form
from service.params import SegmentParams, describe_errors, parse_params

if TYPE_CHECKING:
    from service.core.pipeline import Pipeline, RequestContext
    from service.settings import Settings

__all__ = ["FROM_UPLOAD", "FROM_URL", "TAG", "error", "operations"]

TAG = "rembg"
# rembg's alpha matting defaults: its trimap's thresholds and erosion.
MATTING_DEFAULTS = {"af": 240, "ab": 10, "ae": 10}


class RembgParams(BaseModel):
    """rembg 2.0.86's ``/api/remove`` parameters (the image aside); the descriptions are its
    OpenAPI document's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="one of the loaded models; default: the first")
    a: bool = Field(
        False,
        description="alpha matting: on the cut-out this service's matte (alpha=matte), with om "
        "its edge refinement (refine=true)",
    )
    af: int = Field(
        240,
        ge=0,
        le=255,
        description="alpha matting's foreground threshold: only 240 (rembg's default)",
    )
    ab: int = Field(
        10,
        ge=0,
        le=255,
        description="alpha matting's background threshold: only 10 (rembg's default)",
    )
    ae: int = Field(10, ge=0, description="alpha matting's erosion: only 10 (rembg's default)")
    om: bool = Field(
        False,
        description="only the mask: the soft map (output=probability); with ppm, the binary mask",
    )
    ppm: bool = Field(False, description="post-process the mask: binary (0/255)")
    dc: bool = Field(False, description="only false")
    vm: bool = Field(False, description="only false")
    bgc: str | None = Field(
        None,
        pattern=r"^\s*\d{1,3}\s*(,\s*\d{1,3}\s*){2,3}$",
        description="a background colour for the cut-out: r,g,b or r,g,b,a, each 0 to 255",
    )
    extras: str | None = Field(None, description="only empty (or {})")


_PATTERNS = {"bgc": "a colour is r,g,b or r,g,b,a, each 0 to 255 (255,255,255,255)"}


def _validated(fields: dict[str, object]) -> RembgParams:
    try:
        return RembgParams.model_validate(fields)
    except ValidationError as exc:
        raise InvalidParameter(describe_errors(exc, _PATTERNS)) from exc


def _colour(bgc: str) -> str:
    """rembg's ``bgc`` as the service's ``rrggbb`` or ``rrggbbaa``."""
    values = [int(v) for v in bgc.split(",")]
    if any(v > 255 for v in values):
        raise InvalidParameter(f"bgc: {bgc!r}: each value is 0 to 255")
    return "".join(f"{v:02x}" for v in values)


def _refuse_what_cannot_be_honoured(p: RembgParams) -> None:
    changed = [f"{k}={getattr(p, k)}" for k, v in MATTING_DEFAULTS.items() if getattr(p, k) != v]
    if changed:
        raise UnsupportedParameter(
            f"{', '.join(changed)}: a=true is this service's matte, whose band the map's own "
            "uncertainty finds, with no trimap: af, ab and ae are accepted only at rembg's "
            "defaults (240, 10, 10)"
        )
    if p.dc:
        raise UnsupportedParameter("dc: this service does not decontaminate edges; leave it out")
    if p.vm:
        raise UnsupportedParameter("vm: this service has no ViTMatte; use a=true for its matte")
    if p.extras is not None and p.extras.strip():
        try:
            empty = json.loads(p.extras) == {}
        except ValueError:
            empty = False
        if not empty:
            raise UnsupportedParameter(
                "extras: this service's models take no extra options; leave it out"
            )


def _params(p: RembgParams) -> SegmentParams:
    if p.om:
        if p.bgc is not None:
            raise InvalidParameter("bgc: applies to the cut-out, not to om=true (a mask)")
        given = {"output": "mask" if p.ppm else "probability"}
        if p.a:
            given["refine"] = "true"
    else:
        given = {"output": "cutout", "alpha": "matte" if p.a else "soft"}
        if p.bgc:
            given["bg_color"] = _colour(p.bgc)
    return parse_params(given)


def _submission(
    form: Form, reading: Reading, *, image: bytes | None = None, url: str | None = None
) -> Submission:
    p = _validated(form.fields)
    if p.model is not None and p.model not in reading.models:
        loaded = ", ".join(reading.models)
        raise InvalidParameter(f"model: {p.model!r} is not loaded; this service has {loaded}")
    _refuse_what_cannot_be_honoured(p)
    return Submission(_params(p), image=image, url=url, model=p.model)


@dataclass(frozen=True)
class _RembgCall:
    submission: Submission

    async def answer(self, pipeline: Pipeline, ctx: RequestContext) -> Response:
        rendered = await pipeline.answer(self.submission, ctx)
        return Response(rendered.body, media_type=rendered.media_type, headers=rendered.headers)


_AS_400 = {"invalid_url", "url_forbidden"}


class _ErrorBody(TypedDict):
    detail: Annotated[str, Field(description="what was wrong")]
    code: Annotated[str, Field(description="the service's error code")]


def error(exc: ServiceError) -> Response:
    """An error as rembg's FastAPI app writes them (``detail``), with the service's ``code``;
    a refused URL is rembg's 400."""
    status = 400 if exc.code in _AS_400 else exc.status
    body: _ErrorBody = {"detail": exc.message, "code": exc.code}
    return JSONResponse(body, status, headers=exc.headers)


class _FromUpload:
    """``POST /api/remove``: the image as the multipart field ``file``."""

    name = "rembg"

    def body_limit(self, settings: Settings) -> int:
        return settings.max_upload_bytes + MULTIPART_OVERHEAD

    async def read(self, request: Request, reading: Reading) -> Call:
        form = await read_form(
            request,
            reading.max_bytes + MULTIPART_OVERHEAD,
            reading.timeout_s,
            files=("file",),
            pool=reading.pool,
        )
        image = form.files.get("file")
        if image is None:
            raise InvalidParameter(
                "file: field required: send the image as the multipart field 'file'"
            )
        if len(image) > reading.max_bytes:
            raise ImageTooLarge(
                f"the image is {len(image)} bytes; the limit is {reading.max_bytes}"
            )
        return _RembgCall(_submission(form, reading, image=image))

    def error(self, exc: ServiceError) -> Response:
        return error(exc)


class _FromUrl:
    """``GET /api/remove?url=``: an image the service fetches."""

    name = "rembg"

    def body_limit(self, settings: Settings) -> int:
        return MULTIPART_OVERHEAD

    async def read(self, request: Request, reading: Reading) -> Call:
        form = await read_form(request, MULTIPART_OVERHEAD, reading.timeout_s)
        fields = dict(form.fields)
        url = fields.pop("url", None)
        if not reading.url_input:
            raise InvalidParameter("url: this service does not fetch images by URL")
        if not isinstance(url, str) or not url:
            raise InvalidParameter("url: field required: the image's http(s) URL")
        return _RembgCall(_submission(Form(fields, {}), reading, url=url))

    def error(self, exc: ServiceError) -> Response:
        return error(exc)


FROM_UPLOAD = _FromUpload()
FROM_URL = _FromUrl()


# -- the document (service/http/schema.py writes it) ----------------------------------------------

_ERRORS = Errors(schema_of(_ErrorBody))
_ANSWERS = {
    200: Answer(
        "A PNG: the cut-out (RGBA; RGB on an opaque bgc), or with om=true the mask",
        {"image/png": Media()},
    ),
    400: _ERRORS(
        "A parameter this service cannot honour (af, ab or ae off rembg's defaults, dc, vm, "
        "extras), an empty or malformed body, or a URL that is not an http(s) URL or leads to "
        "an address the service does not fetch from"
    ),
    401: _ERRORS("U2SERVE_API_KEY is set and the request has no valid key"),
    408: _ERRORS("The request did not arrive in time"),
    413: _ERRORS("Too many bytes or pixels"),
    415: _ERRORS("Not a decodable image"),
    422: _ERRORS(
        "A value that is not valid, an unknown parameter, one given twice, a model that is not "
        "loaded, no file (POST) or no url (GET)"
    ),
    503: _ERRORS("Overloaded, not ready or draining; see Retry-After"),
    504: _ERRORS("The request waited in the queue past its deadline"),
}
# rembg reads these from the query, the rest from the form; this service takes each from either
# (once).
_IN_QUERY = ("bgc", "extras")


def operations(offer: Offer) -> list[Operation]:
    """``GET`` and ``POST /api/remove`` (one route serves both), with the loaded models as
    ``model``'s values; without URL input, ``GET`` says that it answers 422."""
    fields = [choice(p, offer.models) if p.name == "model" else p for p in params(RembgParams)]
    from_url = Operation(
        "get",
        "/api/remove",
        "rembg_remove_from_url",
        "rembg: remove the background of an image fetched from a URL",
        _ANSWERS,
        tags=[TAG],
        description=""
        if offer.url_input
        else "This service does not fetch images by URL (U2SERVE_URL_INPUT=false): every "
        "request is answered 422.",
        query=[param("url", Url, "the image's http(s) URL", required=True), *fields],
    )
    from_upload = Operation(
        "post",
        "/api/remove",
        "rembg_remove_from_upload",
        "rembg: remove the background of an uploaded image",
        _ANSWERS,
        tags=[TAG],
        query=[p for p in fields if p.name in _IN_QUERY],
        body=Body(
            {
                "multipart/form-data": Fields(
                    [
                        param("file", Annotated[bytes, Field(min_length=1)]),
                        *(p for p in fields if p.name not in _IN_QUERY),
                    ],
                    required=("file",),
                )
            }
        ),
    )
    return [from_url, from_upload]
