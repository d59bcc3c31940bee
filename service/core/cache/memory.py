"""The in-process backend: least-recently-used maps bounded by bytes, and uploads bounded by
bytes and by time since their last use. Everything runs on the event loop (dictionary work, no
copies), so no lock is needed."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from service.metrics import Metrics

__all__ = ["MemoryMapCache", "MemoryUploadStore"]


class MemoryMapCache:
    """Maps by key, at most ``max_bytes`` of them (0: none kept); the least recently used go
    first. ``hits`` and ``misses`` count lookups, for the command line's summary (the service
    counts its own, by model, where it knows which model asked)."""

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self._maps: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._metrics = metrics
        self.hits = self.misses = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._maps)

    async def get(self, key: str) -> bytes | None:
        return self.lookup(key)

    async def put(self, key: str, levels: bytes) -> None:
        self.keep(key, levels)

    def lookup(self, key: str) -> bytes | None:
        """:meth:`get` for synchronous callers (the command line)."""
        levels = self._maps.get(key)
        if levels is None:
            self.misses += 1
            return None
        self._maps.move_to_end(key)
        self.hits += 1
        return levels

    def keep(self, key: str, levels: bytes) -> None:
        """:meth:`put` for synchronous callers."""
        if len(levels) > self.max_bytes:
            return
        old = self._maps.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._maps[key] = levels
        self._bytes += len(levels)
        while self._bytes > self.max_bytes:
            _, evicted = self._maps.popitem(last=False)
            self._bytes -= len(evicted)
            if self._metrics:
                self._metrics.map_cache_evictions.inc()
        if self._metrics:
            self._metrics.map_cache_bytes.set(self._bytes)


class MemoryUploadStore:
    """Uploads by image id, at most ``max_bytes`` of them, each for ``ttl_s`` after its last
    use; when a new one does not fit, the least recently used go first."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._metrics = metrics
        self._clock = clock
        # id → (owner, bytes, time of last use); in order of last use.
        self._kept: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _drop(self, image_id: str, *, evicted: bool) -> None:
        _, data, _ = self._kept.pop(image_id)
        self._bytes -= len(data)
        if evicted:
            self._metrics.upload_cache_evictions.inc()

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        while self._kept:
            image_id, (_, _, used) = next(iter(self._kept.items()))
            if used > cutoff:
                break
            self._drop(image_id, evicted=False)

    async def put(self, image_id: str, owner: str, data: bytes) -> bool:
        self._expire()
        if len(data) > self.max_bytes:
            self._metrics.upload_cache_bytes.set(self._bytes)
            return False
        while self._bytes + len(data) > self.max_bytes:
            self._drop(next(iter(self._kept)), evicted=True)
        self._kept[image_id] = (owner, data, self._clock())
        self._bytes += len(data)
        self._metrics.upload_cache_bytes.set(self._bytes)
        return True

    async def get(self, image_id: str, owner: str) -> bytes | None:
        self._expire()
        self._metrics.upload_cache_bytes.set(self._bytes)
        entry = self._kept.get(image_id)
        if entry is None or entry[0] != owner:
            return None
        self._kept[image_id] = (owner, entry[1], self._clock())
        self._kept.move_to_end(image_id)
        return entry[1]
