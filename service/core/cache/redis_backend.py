"""The shared backend: maps and uploads in Redis, so every replica answers every id and computes
each photo's map once.

Redis bounds them itself: every key has a time to live (maps ``U2SERVE_CACHE_MAP_TTL_S``, uploads
``U2SERVE_CACHE_UPLOAD_TTL_S`` after their last use), and its ``maxmemory`` with a
``volatile-lru`` or ``allkeys-lru`` policy bounds their bytes (README, "Sharing maps between
replicas").

Redis is an optimisation, never a dependency: each call has ``U2SERVE_CACHE_TIMEOUT_MS``, and an
error or a timeout counts in ``u2serve_cache_fallbacks_total``, is logged (at most once every
few seconds), and makes the caller go on without it: a map is computed, an upload is not kept (the
answer has no ``X-Image-Id``), an id is not found. After a failure Redis is left alone for
``_PAUSE_S``, so that while it is down requests do not each wait for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.metrics import Metrics
from service.settings import Settings

__all__ = ["RedisBackend"]

log = logging.getLogger("u2serve")

T = TypeVar("T")

_PREFIX = "u2serve:"
_PAUSE_S = 2.0  # after a failure, how long requests go on without Redis before it is tried again
_LOG_EVERY_S = 10.0
_OWNER_BYTES = 32  # owner_of's hex digits, stored before an upload's bytes


class _Guard:
    """Runs Redis calls within the timeout; on any failure, counts, logs and gives a default."""

    def __init__(self, timeout_s: float, metrics: Metrics) -> None:
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._paused_until = 0.0
        self._logged = -_LOG_EVERY_S

    async def run(self, operation: str, call: Callable[[], Awaitable[T]], default: T) -> T:
        now = time.monotonic()
        if now < self._paused_until:
            self._metrics.cache_fallbacks.labels(operation=operation).inc()
            return default
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            now = time.monotonic()
            self._paused_until = now + _PAUSE_S
            self._metrics.cache_fallbacks.labels(operation=operation).inc()
            if now - self._logged >= _LOG_EVERY_S:
                self._logged = now
                log.warning(
                    "the cache at Redis failed (%s: %s); going on without it for %g s",
                    operation,
                    type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                    _PAUSE_S,
                )
            return default


class RedisMapCache:
    def __init__(self, client: redis.Redis, guard: _Guard, ttl_s: int, metrics: Metrics) -> None:
        self._client, self._guard, self._ttl_s, self._metrics = client, guard, ttl_s, metrics

    async def get(self, key: str) -> bytes | None:
        async def call() -> bytes | None:
            value = await self._client.get(_PREFIX + "map:" + key)
            return value if isinstance(value, bytes) else None

        return await self._guard.run("map_get", call, None)

    async def put(self, key: str, levels: bytes) -> None:
        async def call() -> None:
            await self._client.set(_PREFIX + "map:" + key, levels, ex=self._ttl_s)

        await self._guard.run("map_put", call, None)


class RedisUploadStore:
    def __init__(self, client: redis.Redis, guard: _Guard, ttl_s: int) -> None:
        self._client, self._guard, self._ttl_s = client, guard, ttl_s

    async def put(self, image_id: str, owner: str, data: bytes) -> bool:
        async def call() -> bool:
            value = owner.encode().ljust(_OWNER_BYTES, b" ") + data
            await self._client.set(_PREFIX + "upload:" + image_id, value, ex=self._ttl_s)
            return True

        return await self._guard.run("upload_put", call, False)

    async def get(self, image_id: str, owner: str) -> bytes | None:
        async def call() -> bytes | None:
            # GETEX: the id lives for the TTL after its last use, as in memory.
            value = await self._client.getex(_PREFIX + "upload:" + image_id, ex=self._ttl_s)
            return value if isinstance(value, bytes) else None

        value = await self._guard.run("upload_get", call, None)
        if value is None or value[:_OWNER_BYTES] != owner.encode().ljust(_OWNER_BYTES, b" "):
            return None
        return value[_OWNER_BYTES:]


class RedisBackend:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if settings.cache_url is None:
            raise ValueError("the Redis backend needs U2SERVE_CACHE_URL")
        timeout_s = settings.cache_timeout_ms / 1000
        self._client = redis.Redis.from_url(
            settings.cache_url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # A failure is answered by computing, not by waiting for retries.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )
        guard = _Guard(timeout_s, metrics)
        self.maps = RedisMapCache(self._client, guard, settings.cache_map_ttl_s, metrics)
        self.uploads = RedisUploadStore(self._client, guard, settings.cache_upload_ttl_s)

    async def close(self) -> None:
        await self._client.aclose()
