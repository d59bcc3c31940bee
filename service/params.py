"""What a client may ask of ``POST /segment`` (query string or form fields), validated once.

The same model drives the HTTP API, its OpenAPI document and the command line, so a parameter
added here is available, documented and validated everywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InvalidParameter

__all__ = ["Format", "Output", "SegmentParams", "parse_params"]

Output = Literal["mask", "probability", "cutout"]
Format = Literal["png", "webp"]


class SegmentParams(BaseModel):
    """Parameters of ``POST /segment``, from the query string or multipart form fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Output = Field(
        "mask",
        description="mask: binary 0/255, one channel; probability: the soft 8-bit map; "
        "cutout: RGBA, the photo with the mask as alpha",
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="pixels with probability ≥ threshold are foreground"
    )
    format: Format = Field("png", description="image format of the answer")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"]) or "parameters"
        msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def parse_params(values: dict[str, str]) -> SegmentParams:
    """Validate raw parameter values; 422 naming every bad or unknown one."""
    try:
        return SegmentParams.model_validate(values)
    except ValidationError as exc:
        raise InvalidParameter(_describe(exc)) from exc
