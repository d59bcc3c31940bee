"""remove.bg's API, as remove.bg documents it: ``POST /v1.0/removebg`` and ``GET /v1.0/account``.

A request (multipart, form-encoded or JSON; ``X-Api-Key``) is translated into a
:class:`~service.core.request.Submission`:

- the image: ``image_file``, ``image_file_b64`` or ``image_url`` (through the service's own
  URL fetcher), exactly one;
- ``channels``: ``rgba`` is ``output=cutout`` with the service's matte (``alpha=matte``: alpha
  solved from the photo at the subject's boundary, and the subject's own colour there), as
  remove.bg's cut-outs have soft edges; ``alpha`` is ``output=mask``, the binary mask;
- ``size``: the answer at most 0.25 MP (``preview``, ``small``, ``regular``: remove.bg's
  default), 1.5 MP (``medium``), 4 MP (``hd``), or the photo's own size (``full``, ``4k``,
  ``50MP``, ``auto``), by the service's ``max_side`` scaling (:attr:`Submission.max_pixels`);
- ``format``: ``png``, ``webp``, ``jpg`` (on ``bg_color``, white if none: JPEG has no
  transparency), ``auto`` (``jpg`` on an opaque ``bg_color``, else ``png``), or ``zip``
  (``color.jpg``, the cut-out on white, and ``alpha.png``, the mask: two answers of the same
  upload, the second from the map cache);
- ``crop``, ``crop_margin`` (one margin for every side), ``bg_color`` (hex, with or without
  ``#``, 3, 4, 6 or 8 digits, or a colour name), ``type`` (accepted: one model serves every type),
  ``type_level``;
- ``roi``, ``scale`` and ``position`` only at their defaults (the whole photo, in place),
  ``add_shadow`` and ``semitransparency`` only false: the service has no way to honour other
  values, so they are refused (400), as are ``bg_image_url``/``bg_image_file`` and the shadow's
  options. So is any other parameter.

The answer is the image (or, with ``Accept: application/json``, remove.bg's JSON with
``result_b64``) with remove.bg's headers: ``X-Width``, ``X-Height``, ``X-Type`` (the type asked
for; ``other`` for ``auto``: the service does not classify), ``X-Credits-Charged: 0`` and the
subject's box, ``X-Foreground-Top``/``-Left``/``-Width``/``-Height``. A photo with no foreground
is remove.bg's 400 ``unknown_foreground``. Errors are remove.bg's shape,
``{"errors": [{"title": ..., "code": ...}]}``: 400 for anything wrong with the parameters or the
image (as remove.bg answers it), 403 ``auth_failed`` for a wrong key; overload stays 503 with
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Literal

from PIL import ImageColor
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from typing_extensions import TypedDict  # pydantic describes typing's only from Python 3.12

from service.core.access import AccessRecord
from service.core.pipeline import RequestContext
from service.core.request import Submission
from service.errors import (
    BadRequest,
    ImageTooLarge,
    InvalidParameter,
    ServiceError,
    UnsupportedParameter,
)
from service.http.api import Call, Reading
from service.http.schema import (
    Answer,
    Body,
    Errors,
    Fields,
    Media,
    Offer,
    Operation,
    param,
    params,
    schema_of,
)
from service.http.upload import MULTIPART_OVERHEAD, Form, read_form
from service.images.encode import Rendered
from service.params import SegmentParams, describe_errors, parse_params

if TYPE_CHECKING:
    from service.core.pipeline import Pipeline
    from service.settings import Settings

__all__ = ["API", "TAG", "UnknownForeground", "account", "error", "operations"]

TAG = "remove.bg"

Size = Literal["preview", "small", "regular", "medium", "hd", "full", "4k", "50MP", "auto"]
# The most pixels of each size's answer; None: the photo's own size.
SIZES: dict[str, int | None] = {
    "preview": 250_000,
    "small": 250_000,
    "regular": 250_000,
    "medium": 1_500_000,
    "hd": 4_000_000,
    "full": None,
    "4k": None,
    "50MP": None,
    "auto": None,
}
ForegroundType = Literal["auto", "person", "product", "animal", "car", "transportation", "graphic"]
Format = Literal["auto", "png", "jpg", "webp", "zip"]
IMAGE_FIELDS = ("image_file", "image_file_b64", "image_url")
# remove.bg options that need what this service does not do: composing on a background image,
# shadows. Refused when given (an empty value is no value).
_NOT_HONOURED = ("bg_image_url", "bg_image_file", "shadow_type", "shadow_opacity")
_COORD = re.compile(r"^(\d{1,5}(?:\.\d+)?)(px|%)$")
_MARGIN = re.compile(r"^\d{1,5}(px|%)?$")
_HEX = re.compile(r"^#?([0-9a-f]{3,4}|[0-9a-f]{6}|[0-9a-f]{8})$")
_WHITE = "ffffff"
_NO_SPACE = str.maketrans("", "", " \t\r\n")


class RemoveBgParams(BaseModel):
    """remove.bg's parameters of ``POST /v1.0/removebg`` (the uploaded file, ``image_file``,
    aside); the descriptions are its OpenAPI document's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_url: str | None = Field(
        None,
        description="the image's URL, fetched by the service (private, loopback and link-local "
        "addresses are refused); one image source only",
    )
    image_file_b64: str | None = Field(
        None, description="the image file, base64-encoded; one image source only"
    )
    size: Size = Field(
        "preview",
        description="the answer's largest size: preview, small, regular: 0.25 MP; medium: "
        "1.5 MP; hd: 4 MP; full, 4k, 50MP, auto: the photo's own size",
    )
    type: ForegroundType = Field(
        "auto",
        description="accepted; one model serves every type. X-Type echoes it (other for auto)",
    )
    type_level: Literal["none", "1", "2", "latest"] = Field(
        "1", description="none: no X-Type header"
    )
    format: Format = Field(
        "auto",
        description="auto: jpg on an opaque bg_color, else png; jpg: on bg_color, white if "
        "none; zip: color.jpg (the cut-out on white) and alpha.png (the mask)",
    )
    roi: str = Field(
        "0% 0% 100% 100%", description="only the whole photo (the default): another region is a 400"
    )
    crop: bool = Field(False, description="crop to the subject")
    crop_margin: str = Field(
        "0",
        description="with crop=true: a margin in px or % of the subject's size, the same for "
        "every side",
    )
    scale: str = Field("original", description="only original: another is a 400")
    position: str = Field("original", description="only original: another is a 400")
    channels: Literal["rgba", "alpha"] = Field(
        "rgba", description="rgba: the cut-out; alpha: its alpha matte (the binary mask)"
    )
    add_shadow: bool = Field(False, description="only false")
    semitransparency: bool = Field(False, description="only false")
    bg_color: str | None = Field(
        None,
        description="a background colour: hex (81d4fa, fff, 81d4fa77; the # optional) or a "
        "colour name",
    )


class UnknownForeground(ServiceError):
    """remove.bg's answer for a photo in which no subject was found."""

    status, code = 400, "unknown_foreground"


# -- errors --------------------------------------------------------------------------------------


class _Problem(TypedDict):
    title: Annotated[str, Field(description="what was wrong")]
    code: str


class _ErrorBody(TypedDict):
    errors: list[_Problem]


# Everything wrong with a request's parameters or its image is 400 at remove.bg ("invalid
# parameters or input file unprocessable"); remove.bg's own codes where it has one.
_AS_400 = {
    "bad_request": "bad_request",
    "invalid_parameter": "invalid_parameters",
    "unsupported_parameter": "invalid_parameters",
    "image_too_large": "file_too_large",
    "unsupported_image": "unsupported_image",
    "invalid_url": "invalid_url",
    "url_forbidden": "url_forbidden",
    "fetch_failed": "fetch_failed",
    "fetch_timeout": "fetch_timeout",
    "unknown_foreground": "unknown_foreground",
}


def error(exc: ServiceError) -> Response:
    """An error in remove.bg's shape: ``{"errors": [{"title": ..., "code": ...}]}``; a missing
    or wrong key is remove.bg's 403 ``auth_failed``."""
    status, code = exc.status, exc.code
    if code in _AS_400:
        status, code = 400, _AS_400[code]
    elif code == "unauthorized":
        status, code = 403, "auth_failed"
    body: _ErrorBody = {"errors": [{"title": exc.message, "code": code}]}
    return JSONResponse(body, status, headers=exc.headers)


class _Credits(TypedDict):
    total: int
    subscription: int
    payg: int
    enterprise: int


class _Plan(TypedDict):
    free_calls: int
    sizes: str


class _Attributes(TypedDict):
    credits: _Credits
    api: _Plan


class _AccountData(TypedDict):
    attributes: _Attributes


class _Account(TypedDict):
    data: _AccountData


def _account() -> _Account:
    credits: _Credits = {"total": 0, "subscription": 0, "payg": 0, "enterprise": 0}
    return {"data": {"attributes": {"credits": credits, "api": {"free_calls": 0, "sizes": "all"}}}}


def account() -> Response:
    """``GET /v1.0/account`` for a self-hosted service: nothing is sold or charged, so every
    credit count is 0 (and every answer's ``X-Credits-Charged`` is 0), and every size is
    served."""
    return JSONResponse(_account())


# -- reading -------------------------------------------------------------------------------------


def _colour(value: str) -> str:
    """remove.bg's ``bg_color`` (``81d4fa``, ``#fff``, ``81d4fa77``, ``green``) as the service's
    ``rrggbb`` or ``rrggbbaa``."""
    v = value.strip().lower()
    match = _HEX.match(v)
    if match:
        digits = match[1]
        return "".join(c * 2 for c in digits) if len(digits) <= 4 else digits
    if v in ImageColor.colormap:
        return "".join(f"{c:02x}" for c in ImageColor.getrgb(v)[:3])
    raise InvalidParameter(
        f"bg_color: {value!r} is not a colour: hex (81d4fa, fff, or with alpha 81d4fa77, the # "
        "optional) or a colour name (green)"
    )


def _margin(value: str) -> str:
    """``crop_margin``: one value, or two or four equal ones (the service keeps one margin for
    every side), as the service's margin."""
    tokens = value.split()
    if not tokens or len(tokens) not in (1, 2, 4) or not all(_MARGIN.match(t) for t in tokens):
        raise InvalidParameter(
            f"crop_margin: {value!r} is not a margin: pixels (30px) or a percentage of the "
            "subject's size (10%), one value or two or four"
        )
    normal = {t if t.endswith(("px", "%")) else f"{t}px" for t in tokens}
    if len(normal) > 1:
        raise UnsupportedParameter(
            f"crop_margin: {value!r} gives the sides different margins; this service keeps one "
            "margin for every side: give one value"
        )
    return normal.pop()


def _whole(roi: str) -> bool:
    """Whether ``roi`` (``x1 y1 x2 y2``) is the whole photo; a malformed one is a 400."""
    coords = [_COORD.match(t) for t in roi.split()]
    if len(coords) != 4 or not all(coords):
        raise InvalidParameter(
            f"roi: {roi!r} is not a region: four coordinates, each in px or % (0% 0% 100% 100%)"
        )
    x1, y1, x2, y2 = ((float(m[1]), m[2]) for m in coords if m is not None)
    return x1[0] == 0 and y1[0] == 0 and x2 == y2 == (100.0, "%")


def _refuse_what_cannot_be_honoured(p: RemoveBgParams) -> None:
    if not _whole(p.roi):
        raise UnsupportedParameter(
            "roi: this service segments the whole photo; leave roi out (0% 0% 100% 100%)"
        )
    if p.scale != "original":
        if not re.fullmatch(r"\d{1,3}%", p.scale):
            raise InvalidParameter(f"scale: {p.scale!r} is not 'original' or 10% to 100%")
        raise UnsupportedParameter(
            "scale: this service does not rescale the subject in its canvas; leave scale out "
            "(original)"
        )
    if p.position != "original":
        raise UnsupportedParameter(
            "position: this service does not move the subject in its canvas; leave position out "
            "(original)"
        )
    if p.add_shadow:
        raise UnsupportedParameter("add_shadow: this service adds no shadows; leave it out")
    if p.semitransparency:
        raise UnsupportedParameter(
            "semitransparency: this service's masks are opaque or transparent, nothing between; "
            "leave it out (false)"
        )


@dataclass(frozen=True)
class _Output:
    """What the answer is, beside the submission: the mask's parameters for a zip (the
    submission's are the colour image's), whether JSON was asked for, and ``X-Type``."""

    alpha: SegmentParams | None
    json: bool
    x_type: str | None


def _params(p: RemoveBgParams) -> tuple[SegmentParams, SegmentParams | None]:
    """The service's parameters for remove.bg's, and for ``format=zip`` the mask's too."""
    colour = _colour(p.bg_color) if p.bg_color is not None else None
    given: dict[str, str] = {}
    if p.crop:
        given["crop"] = "true"
    if p.crop_margin.strip() not in ("0", "0px", "0%"):
        given["crop_margin"] = _margin(p.crop_margin)  # without crop=true: refused, as /segment
    if p.format == "zip":
        if colour is not None:
            raise InvalidParameter(
                "bg_color: format=zip holds the photo's colours and the alpha matte apart; "
                "leave bg_color out, or ask for png or jpg"
            )
        if p.channels == "alpha":
            raise InvalidParameter("channels=alpha: format=zip already holds the alpha matte")
        rgb = given | {"output": "cutout", "alpha": "matte", "bg_color": _WHITE, "format": "jpeg"}
        return parse_params(rgb), parse_params(given | {"output": "mask"})
    if p.channels == "alpha":
        if colour is not None:
            raise InvalidParameter("bg_color: applies to channels=rgba; the alpha matte has none")
        if p.format == "jpg":
            raise UnsupportedParameter(
                "format=jpg: this service sends the alpha matte losslessly: png, webp or auto"
            )
        fmt = "webp" if p.format == "webp" else "png"
        return parse_params(given | {"output": "mask", "format": fmt}), None
    opaque = colour is not None and (len(colour) == 6 or colour.endswith("ff"))
    if p.format == "jpg" or (p.format == "auto" and opaque):
        if colour is not None and not opaque:
            raise InvalidParameter(
                "format=jpg: JPEG has no transparency, and this bg_color is translucent; give "
                "an opaque one or use png"
            )
        # JPEG has no transparency: on white when no colour is given.
        cutout = given | {
            "output": "cutout",
            "alpha": "matte",
            "bg_color": colour or _WHITE,
            "format": "jpeg",
        }
        return parse_params(cutout), None
    fmt = "webp" if p.format == "webp" else "png"
    cutout = given | {"output": "cutout", "alpha": "matte", "format": fmt}
    if colour is not None:
        cutout["bg_color"] = colour
    return parse_params(cutout), None


def _accepts_json(request: Request) -> bool:
    """remove.bg answers JSON (``result_b64``) to a client that accepts it, as its clients ask
    with ``Accept: application/json``."""
    return "application/json" in request.headers.get("accept", "").lower()


def _validated(form: Form) -> RemoveBgParams:
    values = dict(form.fields)
    for name in _NOT_HONOURED:
        value = values.pop(name, None)
        if value not in (None, "") or form.files.get(name):
            raise UnsupportedParameter(
                f"{name}: this service composes on a colour only (bg_color), and adds no "
                "shadow; leave it out"
            )
    # An empty value is no value: form clients send every field, the unset ones empty.
    values = {k: v for k, v in values.items() if v not in ("", None)}
    try:
        return RemoveBgParams.model_validate(values, strict=form.typed)
    except ValidationError as exc:
        raise InvalidParameter(describe_errors(exc, {})) from exc


def _body_limit(max_bytes: int) -> int:
    # An image as base64 (4/3 of its bytes), percent-encoded in a form body: at most 1.5×.
    return max_bytes * 3 // 2 + MULTIPART_OVERHEAD


class _RemoveBg:
    """``POST /v1.0/removebg``."""

    name = "removebg"

    def body_limit(self, settings: Settings) -> int:
        return _body_limit(settings.max_upload_bytes)

    async def read(self, request: Request, reading: Reading) -> Call:
        if request.query_params:
            raise InvalidParameter(
                f"{', '.join(sorted(request.query_params))}: remove.bg's parameters go in the "
                "body (multipart, form-encoded or JSON), not in the query string"
            )
        form = await read_form(
            request,
            _body_limit(reading.max_bytes),
            reading.timeout_s,
            files=("image_file", "bg_image_file"),
            json_body=True,
            pool=reading.pool,
        )
        p = _validated(form)
        _refuse_what_cannot_be_honoured(p)
        image = form.files.get("image_file")
        sources = [
            name
            for name, value in zip(
                IMAGE_FIELDS, (image, p.image_file_b64, p.image_url), strict=True
            )
            if value is not None
        ]
        if not sources:
            wanted = ", ".join(IMAGE_FIELDS if reading.url_input else IMAGE_FIELDS[:2])
            raise BadRequest(f"no image: give one of {wanted}")
        if len(sources) > 1:
            raise InvalidParameter(f"{', '.join(sources)}: give one image source, not several")
        if p.image_url is not None and not reading.url_input:
            raise InvalidParameter("image_url: this service does not fetch images by URL")
        if image is not None and len(image) > reading.max_bytes:
            raise ImageTooLarge(
                f"the image is {len(image)} bytes; the limit is {reading.max_bytes}"
            )
        params, alpha = _params(p)
        submission = Submission(params, image=image, url=p.image_url, max_pixels=SIZES[p.size])
        x_type = None if p.type_level == "none" else ("other" if p.type == "auto" else p.type)
        out = _Output(alpha, _accepts_json(request), x_type)
        return _RemoveBgCall(submission, p.image_file_b64, reading, out)

    def error(self, exc: ServiceError) -> Response:
        return error(exc)


API = _RemoveBg()


# -- answering -----------------------------------------------------------------------------------


def _from_base64(text: str, max_bytes: int) -> bytes:
    """``image_file_b64``: base64, whitespace and a ``data:…;base64,`` prefix allowed."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = text.translate(_NO_SPACE)
    if len(text) // 4 * 3 > max_bytes + 2:
        raise ImageTooLarge(f"the image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParameter(f"image_file_b64: not base64 ({exc})") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    return data


def _zipped(colour: bytes, alpha: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # JPEG and PNG: compressed already
        z.writestr("color.jpg", colour)
        z.writestr("alpha.png", alpha)
    return buf.getvalue()


def _box(rendered: Rendered) -> dict[str, int]:
    h = rendered.headers
    return {
        side: int(h[f"X-Foreground-{side.title()}"]) for side in ("top", "left", "width", "height")
    }


class _Result(TypedDict):
    result_b64: str
    foreground_top: int
    foreground_left: int
    foreground_width: int
    foreground_height: int


class _JsonAnswer(TypedDict):
    data: _Result


def _json_answer(body: bytes, box: dict[str, int]) -> bytes:
    answer: _JsonAnswer = {
        "data": {
            "result_b64": base64.b64encode(body).decode("ascii"),
            "foreground_top": box["top"],
            "foreground_left": box["left"],
            "foreground_width": box["width"],
            "foreground_height": box["height"],
        }
    }
    return json.dumps(answer, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _RemoveBgCall:
    submission: Submission
    image_b64: str | None  # decoded in the codec pool, off the event loop
    reading: Reading
    out: _Output

    async def answer(self, pipeline: Pipeline, ctx: RequestContext) -> Response:
        loop = asyncio.get_running_loop()
        pool = pipeline.parts.codec_pool
        sub = self.submission
        if self.image_b64 is not None:
            data = await loop.run_in_executor(
                pool, _from_base64, self.image_b64, self.reading.max_bytes
            )
            sub = replace(sub, image=data)
        rendered = await pipeline.answer(sub, ctx)
        if rendered.headers.get("X-Foreground-Width") == "0":
            raise UnknownForeground("Could not identify foreground in image")
        body, media_type = rendered.body, rendered.media_type
        if self.out.alpha is not None:  # format=zip: the mask too, from the map cache
            mask = await self._alpha(pipeline, sub, rendered, ctx)
            body = await loop.run_in_executor(pool, _zipped, rendered.body, mask.body)
            media_type = "application/zip"
        box = _box(rendered)
        width, height = rendered.size or (0, 0)
        headers = dict(rendered.headers)
        headers |= {"X-Width": str(width), "X-Height": str(height), "X-Credits-Charged": "0"}
        if self.out.x_type is not None:
            headers["X-Type"] = self.out.x_type
        if self.out.json:
            doc = await loop.run_in_executor(pool, _json_answer, body, box)
            return Response(doc, media_type="application/json", headers=headers)
        if media_type == "application/zip":
            headers["Content-Disposition"] = 'attachment; filename="no-bg.zip"'
        return Response(body, media_type=media_type, headers=headers)

    async def _alpha(
        self, pipeline: Pipeline, sub: Submission, colour: Rendered, ctx: RequestContext
    ) -> Rendered:
        """The alpha matte of a zip: the same upload's mask, by its image id (its map is in the
        cache by now); the upload again where it could not be kept. Its stages are timed as
        ``alpha_…``; the access line stays the request's."""
        assert self.out.alpha is not None
        image_id = colour.headers.get("X-Image-Id")
        again = (
            Submission(
                self.out.alpha, model=sub.model, image_id=image_id, max_pixels=sub.max_pixels
            )
            if image_id is not None
            else replace(sub, params=self.out.alpha)
        )
        inner = RequestContext(
            AccessRecord(ctx.record.request_id),
            ctx.start,
            ctx.owner,
            time.monotonic(),
            ctx.disconnected,
        )
        mask = await pipeline.answer(again, inner)
        ctx.stages += [replace(stage, name=f"alpha_{stage.name}") for stage in inner.stages]
        return mask


# -- the document (service/http/schema.py writes it) ----------------------------------------------

_ERRORS = Errors(
    schema_of(_ErrorBody),
    example={"errors": [{"title": "what was wrong", "code": "invalid_parameters"}]},
)
_API_KEY = param("X-Api-Key", str, "the API key, where U2SERVE_API_KEY is set")
_AUTH_FAILED = "auth_failed: U2SERVE_API_KEY is set and X-Api-Key is not it"
_ANSWER_HEADERS = [
    param("X-Width", int, "the answer's width"),
    param("X-Height", int, "the answer's height"),
    param("X-Type", str, "the type asked for, other for auto (absent with type_level=none)"),
    param("X-Credits-Charged", float, "always 0: self-hosted"),
    *(
        param(f"X-Foreground-{side.title()}", int, f"the subject's box: {what}")
        for side, what in (
            ("top", "first row"),
            ("left", "first column"),
            ("width", "columns"),
            ("height", "rows"),
        )
    ),
]


def operations(offer: Offer) -> list[Operation]:
    """``POST /v1.0/removebg`` (without URL input, ``image_url`` is none of its fields) and
    ``GET /v1.0/account``."""
    fields = params(RemoveBgParams, omit=() if offer.url_input else ("image_url",))
    remove = Operation(
        "post",
        "/v1.0/removebg",
        "removebg_remove_v1_0_removebg_post",  # FastAPI's id for the route, kept
        "remove.bg: remove the background of an image",
        {
            200: Answer(
                "The cut-out (or with channels=alpha its alpha matte) as PNG, JPEG, WebP or a "
                "ZIP of color.jpg and alpha.png; with Accept: application/json, remove.bg's JSON "
                "with the image as result_b64 and the subject's box",
                {
                    "image/png": Media(),
                    "image/jpeg": Media(),
                    "image/webp": Media(),
                    "application/zip": Media(),
                    "application/json": Media(schema_of(_JsonAnswer)),
                },
                _ANSWER_HEADERS,
            ),
            400: _ERRORS(
                "Invalid parameters (invalid_parameters), one that this service cannot honour, "
                "no image or several, an image that cannot be read (unsupported_image) or is "
                "too large (file_too_large), an image_url that cannot be fetched, or no subject "
                "found (unknown_foreground)"
            ),
            403: _ERRORS(_AUTH_FAILED),
            408: _ERRORS("The request did not arrive in time"),
            503: _ERRORS(
                "The queue or the memory budget is full, or the service is not ready; see "
                "Retry-After"
            ),
            504: _ERRORS("The request waited in the queue past its deadline"),
        },
        tags=[TAG],
        headers=[_API_KEY],
        body=Body(
            {
                "multipart/form-data": Fields([param("image_file", bytes), *fields]),
                "application/x-www-form-urlencoded": Fields(fields),
                "application/json": Fields(fields),
            },
            "remove.bg's parameters: multipart (the image as the file image_file), "
            "form-encoded or JSON; exactly one of image_file, image_file_b64 and image_url",
        ),
    )
    account = Operation(
        "get",
        "/v1.0/account",
        "removebg_account_v1_0_account_get",  # FastAPI's id for the route, kept
        "remove.bg: the account's credits (none: self-hosted)",
        {
            200: Answer(
                "remove.bg's account document, for a self-hosted service: no credits are sold "
                "or charged, so every count is 0; every size is served",
                {"application/json": Media(schema_of(_Account), _account())},
            ),
            403: _ERRORS(_AUTH_FAILED),
        },
        tags=[TAG],
        headers=[_API_KEY],
    )
    return [remove, account]
