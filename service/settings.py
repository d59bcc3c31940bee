"""Every setting of the service, read once from ``U2SERVE_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.engines import DEFAULT_PRECISION, Precision
from model.weights import default_weights_dir
from service.url.addresses import AllowList

__all__ = ["ModelName", "Settings"]

ModelName = Literal["u2net", "u2netp"]


class Settings(BaseSettings):
    """Validated at start-up; an invalid value stops the service with a message naming it."""

    model_config = SettingsConfigDict(env_prefix="U2SERVE_", extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    model: ModelName = "u2net"
    models: Annotated[list[ModelName], NoDecode] = Field(
        default_factory=list,
        description="models to load, comma-separated, the first the default; default: model",
    )
    weights: Path | None = Field(
        None, description="default: <weights_dir>/<model>.safetensors; one model only"
    )
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
        description="faithful (within the parity bounds: on the CPU float32, or U2NET's mixed "
        "int8/float32 model where the CPU has VNNI or AMX), fast (int8 on the CPU, float16 on a "
        "GPU; less faithful, see the README), float32 (float32 on the CPU, whatever the CPU) or "
        "auto (on the CPU int8, and float32 again for the images whose int8 map is uncertain)",
    )
    cascade_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="with precision auto: the uncertainty score from which an image is run "
        "again in float32, 0 (every image) to 1 (none); default: the one measured for the model",
    )
    channels_last: bool = True
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description="default: 1 on the CPU, 32 on a GPU"
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="front processes (HTTP, decoding, encoding) in front of one inference "
        "worker; 1: one process does both",
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
    url_input: bool = Field(True, description="accept an image by URL (the url parameter)")
    url_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts or networks a URL may reach although private (loopback only when "
        "listed), comma-separated",
    )
    url_connect_timeout_s: float = Field(
        5.0, gt=0, le=600, description="longest wait for a URL's server to accept a connection"
    )
    url_read_timeout_s: float = Field(
        10.0, gt=0, le=600, description="longest silence from a URL's server while reading"
    )
    url_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="longest time for a whole fetch: resolving, redirects and the body",
    )
    # The map cache and the kept uploads (service/core/cache/); README, "One upload, many answers".
    cache_url: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="redis://host:port/db (or rediss://): maps and kept uploads live in Redis, "
        "shared by every replica; default: in this process",
    )
    cache_map_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="in-process map cache size (each map is 100 kB for 320×320); 0: none kept",
    )
    cache_map_ttl_s: int = Field(
        24 * 3600, ge=1, description="with Redis: how long a map is kept after it was made"
    )
    cache_upload_bytes: int = Field(
        256 * 1024**2,
        ge=0,
        description="in-process bytes of kept uploads (for image_id); 0: none kept, no ids",
    )
    cache_upload_ttl_s: int = Field(
        900, ge=1, description="how long an upload is kept after its last use (both backends)"
    )
    cache_timeout_ms: float = Field(
        200, gt=0, le=10_000, description="with Redis: longest wait for a call; then do without"
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("url_allow", mode="before")
    @classmethod
    def _parse_allow(cls, value: object) -> object:
        entries = value.split(",") if isinstance(value, str) else value
        if isinstance(entries, list | tuple):
            entries = [str(e).strip() for e in entries if str(e).strip()]
            AllowList.parse(entries)  # a ValueError names the entry that is neither
        return entries

    @model_validator(mode="after")
    def _one_set_of_models(self) -> Settings:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: each model at most once, not {','.join(self.models)}")
        if "model" in self.model_fields_set and self.models and self.model not in self.models:
            raise ValueError(
                f"model: {self.model} is not among models ({','.join(self.models)}); with "
                "U2SERVE_MODELS, U2SERVE_MODEL may only name which of them is the default"
            )
        if self.weights is not None and len(self.served_models) > 1:
            raise ValueError(
                "weights: names one model's file; with several models each is read from "
                "<weights_dir>/<model>.safetensors"
            )
        return self

    @field_validator("api_key", "cache_url", mode="before")
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
    def served_models(self) -> tuple[str, ...]:
        """The models to load, the default first: ``models`` (with ``model``, when given too,
        as the default), else ``model`` alone."""
        if not self.models:
            return (self.model,)
        first = self.model if "model" in self.model_fields_set else self.models[0]
        return (first, *(m for m in self.models if m != first))

    @property
    def default_model(self) -> str:
        return self.served_models[0]

    def weights_for(self, model: str) -> Path:
        """The weights file of one of the served models."""
        return self.weights or self.weights_dir / f"{model}.safetensors"

    @property
    def allow_list(self) -> AllowList:
        return AllowList.parse(self.url_allow)

    @property
    def weights_path(self) -> Path:
        return self.weights_for(self.default_model)
