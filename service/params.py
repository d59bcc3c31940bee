"""What a client may ask of ``POST /segment`` (query string or form fields), validated once.

The same model drives the HTTP API, its OpenAPI document and the command line, so a parameter
added here is available, documented and validated everywhere. Checks that involve several
parameters are model validators whose messages name every parameter involved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import InvalidParameter

__all__ = [
    "CUTOUT_ALPHA",
    "Alpha",
    "Format",
    "Margin",
    "Output",
    "SegmentParams",
    "describe_errors",
    "parse_params",
]

Output = Literal["mask", "probability", "cutout", "box"]
Format = Literal["png", "webp", "jpeg"]
Alpha = Literal["mask", "soft", "matte"]
# A cut-out's alpha when none is asked for (README, "Cut-out edges", has the measurements).
CUTOUT_ALPHA: Alpha = "matte"

_COLOUR = re.compile(r"^#?([0-9a-fA-F]{6})([0-9a-fA-F]{2})?$")
_MARGIN = re.compile(r"^(\d{1,5})(px|%)?$")
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class Margin:
    """A crop margin: ``value`` pixels, or ``value`` percent of the subject's box."""

    value: int
    percent: bool

    def pixels(self, extent: int) -> int:
        """The margin in pixels beside a box side of ``extent`` pixels (percent rounded up)."""
        return -(-self.value * extent // 100) if self.percent else self.value


class SegmentParams(BaseModel):
    """Parameters of ``POST /segment``, from the query string or multipart form fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Output = Field(
        "mask",
        description="mask: binary 0/255, one channel; probability: the soft 8-bit map; "
        "cutout: RGBA, the photo with an alpha made from the map (see alpha; RGB on an opaque "
        "bg_color); "
        "box: no image, a JSON object with the subject's box, its share of the image and the "
        "image's size",
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="pixels with probability ≥ threshold are foreground"
    )
    format: Format = Field(
        "png",
        description="image format of the answer: png and webp are lossless; jpeg only for a "
        "cutout on an opaque bg_color",
    )
    crop: bool = Field(
        False,
        description="crop the answer to the subject's box (plus crop_margin); with no "
        "foreground the whole image is kept. With output=box the JSON gains the crop rectangle",
    )
    crop_margin: str = Field(
        "0",
        pattern=_MARGIN.pattern,
        description="with crop=true: space kept around the box, in pixels (`20` or `20px`) or "
        "in percent of the box's width (left, right) and height (top, bottom) (`10%`); clipped "
        "to the image",
    )
    bg_color: str | None = Field(
        None,
        pattern=_COLOUR.pattern,
        description="cutout only: a background colour, `#rrggbb` or `#rrggbbaa` (the `#` "
        "optional); an opaque colour gives an RGB answer",
    )
    quality: int | None = Field(
        None, ge=1, le=100, description=f"format=jpeg only: 1–100, default {DEFAULT_JPEG_QUALITY}"
    )
    max_side: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="scale the answer down (after cropping, never up) so that its longer side "
        "is at most this many pixels",
    )
    refine: bool = Field(
        False,
        description="refine the map's edges at full resolution with the photo as guide (a fast "
        "guided filter) before thresholding; off by default: the authors' map as it is",
    )
    alpha: Alpha | None = Field(
        None,
        description="cutout only: its alpha. mask: the binary mask (0/255); soft: the network's "
        "map, scaled up smoothly; matte: alpha solved from the photo in a band at the "
        f"subject's boundary. With soft and matte the colour where alpha is partial is the "
        f"subject's own, estimated, without the old background. Default: {CUTOUT_ALPHA}",
    )

    @field_validator("crop_margin", mode="before")
    @classmethod
    def _strip_margin(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _combinations(self) -> Self:
        given = self.model_fields_set
        if "crop_margin" in given and not self.crop:
            raise ValueError("crop_margin: needs crop=true")
        margin = self.margin
        if margin.percent and margin.value > 1000:
            raise ValueError("crop_margin: at most 1000%")
        if self.output == "box":
            extra = sorted(given & {"format", "quality", "bg_color", "max_side"})
            if extra:
                raise ValueError(
                    f"{', '.join(extra)}: output=box answers JSON, not an image; leave "
                    f"{'it' if len(extra) == 1 else 'them'} out"
                )
        if self.bg_color is not None and self.output != "cutout":
            raise ValueError(f"bg_color: applies to output=cutout, not output={self.output}")
        if self.alpha is not None and self.output != "cutout":
            raise ValueError(
                f"alpha: the alpha of a cut-out; applies to output=cutout, not output={self.output}"
            )
        if self.format == "jpeg":
            if self.output != "cutout":
                raise ValueError(
                    f"format=jpeg: only for output=cutout on an opaque bg_color; JPEG is lossy "
                    f"and would alter an output={self.output} map (use png or webp)"
                )
            if self.background is None or self.background[3] != 255:
                raise ValueError(
                    "format=jpeg: JPEG has no transparency, and this cut-out is transparent; "
                    "give an opaque bg_color (e.g. bg_color=ffffff) or use format=png or webp"
                )
        if self.quality is not None and self.format != "jpeg":
            raise ValueError(f"quality: applies to format=jpeg, not format={self.format}")
        return self

    @property
    def margin(self) -> Margin:
        match = _MARGIN.match(self.crop_margin)
        if match is None:  # the field's pattern has already refused it
            raise ValueError(f"crop_margin: {self.crop_margin!r} is not a margin")
        return Margin(int(match[1]), match[2] == "%")

    @property
    def background(self) -> tuple[int, int, int, int] | None:
        """``bg_color`` as (r, g, b, a), or None."""
        if self.bg_color is None:
            return None
        match = _COLOUR.match(self.bg_color)
        if match is None:  # the field's pattern has already refused it
            raise ValueError(f"bg_color: {self.bg_color!r} is not a colour")
        digits = match[1] + (match[2] or "ff")
        r, g, b, a = (int(digits[i : i + 2], 16) for i in range(0, 8, 2))
        return r, g, b, a

    @property
    def cutout_alpha(self) -> Alpha | None:
        """A cut-out's alpha (the one asked for, or the default); None for other outputs."""
        if self.output != "cutout":
            return None
        return CUTOUT_ALPHA if self.alpha is None else self.alpha

    @property
    def soft_map(self) -> bool:
        """Whether the answer is made from the soft map rather than the thresholded mask."""
        return self.output == "probability" or self.cutout_alpha in ("soft", "matte")

    @property
    def jpeg_quality(self) -> int:
        return DEFAULT_JPEG_QUALITY if self.quality is None else self.quality


# What a value of the wrong form should have been, by parameter: pydantic's own message for a
# pattern names the regular expression, which says nothing to a user.
_PATTERNS = {
    "bg_color": "a colour is #rrggbb or #rrggbbaa in hexadecimal (the # optional)",
    "crop_margin": "a margin is a whole number of pixels (20 or 20px) or a percentage (10%)",
}


def describe_errors(exc: ValidationError, patterns: Mapping[str, str] = _PATTERNS) -> str:
    """A validation error as one line naming every bad or unknown parameter; ``patterns``: what
    a value of each patterned parameter should look like (for the other APIs' own names)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        elif err["type"] == "string_pattern_mismatch" and where in patterns:
            msg = patterns[where]
        else:
            msg = err["msg"].removeprefix("Value error, ")
        # A model validator's message already starts with the parameters it names.
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_params(values: dict[str, str]) -> SegmentParams:
    """Validate raw parameter values; 422 naming every bad or unknown one."""
    try:
        return SegmentParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidParameter(describe_errors(exc)) from exc
