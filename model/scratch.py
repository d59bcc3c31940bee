"""Working buffers kept for the next request: the megabytes a request's stages fill and drop (the
decoded photo, the full-size float map a map back compares or rounds) are written into pages
already mapped, instead of pages the kernel must fault in and zero for each request.

At 12 MP the float map is 48 MB: made fresh it cost 11.5 ms, written into a kept buffer 7.3 ms
(cv2.resize and the threshold, one thread, median of ten); under load the kernel's zeroing of
fresh pages was the largest cost beside the JPEG decode itself (``perf``, bench/README.md).

A buffer is lent again only once no array made from it is alive (its reference count says so),
so an array that outlives its request, in a thread still working past its deadline say, is never
written under it. Lent buffers are their requests', within the memory budget's charges; what
the pool keeps unused is bounded (``max_unused``, checked each time one is asked for), and the
service empties the pool whenever its memory budget holds nothing (:func:`clear`), as it gives
the heap back then.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["MAX_UNUSED", "MIN_BYTES", "BufferPool", "array", "clear", "held_bytes", "unused_bytes"]

# What the pool keeps that no request uses (lent buffers are within their requests' charges): a
# 12 MP photo's decode (36 MB), float map (48 MB) and mask (12 MB), for each of two requests.
MAX_UNUSED = 192 * 1024 * 1024
# Below the size from which the service's allocator maps each buffer on its own
# (service/core/budget.py's MMAP_THRESHOLD), freed memory stays in the heap for the next.
MIN_BYTES = 2 * 1024 * 1024
_MB = 1 << 20


def _refs(buffers: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(buffers[i])


# What the count reads for a buffer held by the pool's list alone (arrays made from a buffer
# hold a reference to it: NumPy's views keep the array that owns the memory as their base).
_UNUSED = _refs([np.empty(1, np.uint8)], 0)


class BufferPool:
    """Thread-safe."""

    def __init__(self, max_unused: int = MAX_UNUSED) -> None:
        self.max_unused = max_unused
        self._buffers: list[np.ndarray] = []  # flat uint8, each owning its memory
        self._lock = threading.Lock()

    def array(self, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` whose values are whatever a previous
        user left (write every element before reading one), in a kept buffer where one is
        unused; the buffer is lent again once this array and every view of it are gone."""
        dt = np.dtype(dtype)
        need = int(np.prod(shape)) * dt.itemsize
        # The heap keeps the small ones between requests already; one over the bound is never kept.
        if not MIN_BYTES <= need <= self.max_unused:
            return np.empty(shape, dt)
        with self._lock:
            buf = self._unused_fit(need)
            if buf is None:
                buf = np.empty(-(-need // _MB) * _MB, np.uint8)  # a few pixels apart: one size
                self._buffers.append(buf)
            self._trim()
        return buf[:need].view(dt).reshape(shape)

    def _unused(self) -> list[int]:
        """The indices of the buffers no array is made from now. By index: a name bound to a
        buffer would count as a reference to it."""
        return [i for i in range(len(self._buffers)) if _refs(self._buffers, i) <= _UNUSED]

    def _unused_fit(self, need: int) -> np.ndarray | None:
        """The least unused buffer that holds ``need`` bytes, unless it is more than twice
        that: a small map does not hold a large photo's buffer while that photo's request
        makes one afresh."""
        fits = [i for i in self._unused() if need <= self._buffers[i].nbytes <= 2 * need]
        if not fits:
            return None
        return self._buffers[min(fits, key=lambda i: self._buffers[i].nbytes)]

    def _trim(self) -> None:
        """Drop unused buffers, the smallest first, until at most ``max_unused`` bytes are.
        Lent ones are their requests' (charged to them): only what none uses is bounded here."""
        unused = sorted(self._unused(), key=lambda i: self._buffers[i].nbytes)
        kept = sum(self._buffers[i].nbytes for i in unused)
        dropped = []
        for i in unused:
            if kept <= self.max_unused:
                break
            kept -= self._buffers[i].nbytes
            dropped.append(i)
        for i in sorted(dropped, reverse=True):
            del self._buffers[i]

    def clear(self) -> None:
        """Forget every buffer: unused ones are freed now, lent ones when their arrays go."""
        with self._lock:
            self._buffers.clear()

    @property
    def held_bytes(self) -> int:
        """The bytes of the buffers the pool holds, lent or not."""
        with self._lock:
            return sum(b.nbytes for b in self._buffers)

    @property
    def unused_bytes(self) -> int:
        """The bytes of the buffers the pool holds that no array is made from now."""
        with self._lock:
            return sum(self._buffers[i].nbytes for i in self._unused())


_POOL = BufferPool()


def array(shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """An array from the process's pool (:meth:`BufferPool.array`)."""
    return _POOL.array(shape, dtype)


def clear() -> None:
    """Forget the process's kept buffers (:meth:`BufferPool.clear`)."""
    _POOL.clear()


def held_bytes() -> int:
    """What the process's pool holds, lent or not."""
    return _POOL.held_bytes


def unused_bytes() -> int:
    """What the process's pool holds that no request uses now."""
    return _POOL.unused_bytes
