"""Every setting of the service, read once from ``U2SERVE_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.engines import DEFAULT_PRECISION, Precision
from model.weights import default_weights_dir

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Validated at start-up; an invalid value stops the service with a message naming it."""

    model_config = SettingsConfigDict(env_prefix="U2SERVE_", extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    model: Literal["u2net", "u2netp"] = "u2net"
    weights: Path | None = Field(None, description="default: <weights_dir>/<model>.safetensors")
    weights_dir: Path = Field(default_factory=default_weights_dir)
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N"
    )
    require_gpu: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    engine: Literal["auto", "torch", "mnn", "openvino"] = Field(
        "auto",
        description="auto: torch on a GPU; on the CPU mnn (float32), or openvino (int8) for the "
        "fast precision",
    )
    precision: Precision = Field(
        DEFAULT_PRECISION,
        description="faithful (float32 on the CPU, within the parity bounds) or fast (int8 on "
        "the CPU, float16 on a GPU; less faithful, see the README)",
    )
    channels_last: bool = True
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description="default: 1 on the CPU, 32 on a GPU"
    )
    max_batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    max_queue: int = Field(64, ge=1, le=100_000)
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    # One core fewer than there are: the network's threads run in lockstep, and an encode that
    # takes one of their cores stalls them all (bench/README.md, the thread split).
    codec_threads: int = Field(
        default_factory=lambda: max(1, len(os.sched_getaffinity(0)) - 1), ge=1, le=256
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for the network; default: every core"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key: SecretStr | None = None
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)
    warmup: bool = True
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    memory_budget_bytes: int = Field(
        2 * 1024**3,
        ge=1024**2,
        description="bytes the requests in flight may hold, decode to encode (fits a 4 GiB "
        "container with the model)",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="longest time a request's body may take to arrive"
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="longest time from connecting (or the last answer) to a request's headers",
    )
    max_connections: int = Field(
        256, ge=1, le=100_000, description="open connections; beyond that new ones get 503"
    )
    log_format: Literal["text", "json"] = "text"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """``U2SERVE_*`` names in ``environ`` that are no setting (a typo is otherwise silent)."""
        known = {f"U2SERVE_{name.upper()}" for name in cls.model_fields}
        return sorted(
            k for k in environ if k.upper().startswith("U2SERVE_") and k.upper() not in known
        )

    @property
    def weights_path(self) -> Path:
        return self.weights or self.weights_dir / f"{self.model}.safetensors"
