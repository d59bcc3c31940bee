"""What the service keeps between requests: each photo's 8-bit network map (the map cache), and
the uploaded bytes behind each image id (the upload store), so a client can ask for another
answer for the same photo without uploading it again, and no replica runs the network twice.

Two backends with one interface: the process's own memory (the default; ``memory.py``), or Redis
(``U2SERVE_CACHE_URL=redis://…``; ``redis_backend.py``), shared by every replica. Either may
forget anything at any time: a missing map is computed again, a missing upload is a 404 that
tells the client to upload again. A Redis that is down or slow never fails a request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from service.metrics import Metrics
from service.settings import Settings

__all__ = [
    "Caches",
    "MapCache",
    "UploadStore",
    "digest",
    "map_key",
    "new_image_id",
    "open_caches",
    "owner_of",
    "valid_image_id",
]

# 16 random bytes, URL-safe base64 without padding: 128 bits, not guessable.
_ID_BYTES = 16
_IMAGE_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


class MapCache(Protocol):
    """Network maps (S×S uint8, as bytes) by :func:`map_key`; least recently used go first."""

    async def get(self, key: str) -> bytes | None:
        """The map, or None (never kept, forgotten, or the backend is unreachable)."""
        ...

    async def put(self, key: str, levels: bytes) -> None:
        """Keep a map if the backend can; never raises."""
        ...


class UploadStore(Protocol):
    """Uploaded bytes by image id, for a while, each readable only by the owner that put it."""

    async def put(self, image_id: str, owner: str, data: bytes) -> bool:
        """Keep an upload; False if it could not be kept (too large, or unreachable)."""
        ...

    async def get(self, image_id: str, owner: str) -> bytes | None:
        """The bytes kept under ``image_id`` for ``owner`` (refreshing their time), or None."""
        ...


@dataclass(frozen=True)
class Caches:
    """The map cache and the upload store a runtime uses, and how to close them."""

    maps: MapCache
    uploads: UploadStore
    close: Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def open_caches(settings: Settings, metrics: Metrics) -> Caches:
    """Redis when ``cache_url`` is set, else the process's memory; nothing connects yet."""
    if settings.cache_url is not None:
        from service.core.cache.redis_backend import RedisBackend

        shared = RedisBackend(settings, metrics)
        return Caches(shared.maps, shared.uploads, shared.close)
    from service.core.cache.memory import MemoryMapCache, MemoryUploadStore

    return Caches(
        MemoryMapCache(settings.cache_map_bytes, metrics),
        MemoryUploadStore(settings.cache_upload_bytes, settings.cache_upload_ttl_s, metrics),
        _nothing,
    )


def digest(data: bytes) -> str:
    """The uploaded bytes' SHA-256: the part of a map's key that names the photo."""
    return hashlib.sha256(data).hexdigest()


def map_key(identity: str, photo_digest: str) -> str:
    """A map's key: the photo's digest under the identity of what computed the map (model,
    weights digest, engine and its file's digest, device type, dtype: see
    ``Segmenter.identity``), so a different model, weights or engine never shares a map."""
    return f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}:{photo_digest}"


def owner_of(api_key: str | None) -> str:
    """Who may use an image id: a digest of the API key it was uploaded with ("" without keys),
    so the store never holds the key itself."""
    if api_key is None:
        return ""
    return hmac.new(b"u2serve image owner", api_key.encode(), hashlib.sha256).hexdigest()[:32]


def new_image_id() -> str:
    """A fresh id: random, so it says nothing about the photo (not even whether two uploads
    were the same photo)."""
    return secrets.token_urlsafe(_ID_BYTES)


def valid_image_id(value: str) -> bool:
    return _IMAGE_ID.match(value) is not None
