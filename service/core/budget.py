"""Admission by memory: the bytes that accepted requests may hold at once, decode to encode.

A request is charged for its decoded pixels before they exist (the size comes from the image's
header), and releases the charge when its answer is encoded. The queue bounds how many requests
wait; this bounds what they hold, so a burst of large images that are small on the wire cannot
take the process past its container's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from model import scratch
from service.errors import ImageTooLarge, QueueFull

if TYPE_CHECKING:  # not imported before the supervisor has told prometheus-client its folder
    from service.metrics import Metrics

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "Charge",
    "MemoryBudget",
    "give_back_memory",
    "limit_arenas",
    "map_large_buffers",
    "request_cost",
    "upload_cost",
]

log = logging.getLogger(__name__)

# Peak bytes per pixel of one request, decode to encode, beyond the model's own working memory
# (one batch's activations, a fixed amount). A request holds its photo throughout (RGB, 3; with
# transparency also its alpha and the network's view over white, 7) and adds, stage by stage, at
# its peak (`python -m bench.codecs --memory` and the same measurement per input kind, 12 MP;
# before the codec layer → now):
#   decoding          a JPEG 10.6 → 3.1 (libjpeg-turbo fills the array itself); a PNG 10.1,
#                     with alpha 12.2 (Pillow, as before)
#   the map back      6.1 (the full-size float map and the mask)
#   encoding          the map 1 (PNG); a cut-out 13 → 2.1 (PNG, JPEG on a colour: libvips
#                     composes strip by strip), 9.8 with max_side (Pillow's Lanczos needs the
#                     RGBA), 11-13 on a colour with the photo's own partial transparency
#                     (Pillow blends it); WebP 8.6 for a map, 19-21 for a cut-out (libwebp's
#                     lossless encoder, either codec)
# The charge is the largest stage with what is held, rounded up (the cut-out's was 20 and its
# WebP's 23.8 was not counted; a map with transparency peaks at 13.1, not the 10 it had), so
# the charges bound the memory actually used (tests/test_limits.py holds a burst to it).
_BYTES_PER_PIXEL = {
    # (alpha, cutout, webp): bytes
    (False, False, False): 10,
    (False, False, True): 13,
    (False, True, False): 14,
    (False, True, True): 24,
    (True, False, False): 14,
    (True, False, True): 17,
    (True, True, False): 22,
    (True, True, True): 29,
}


# A cut-out whose alpha is not the mask holds more while its answer is made: the foreground's
# colour (a copy of the photo) and for a matte the alpha scaled up from the working resolution
# (service/images/matte.py; its other planes are at the working resolution, 150 000 pixels at
# most). Measured at 12 MP (the reference bike photo at 12 MP, U2NET's map; tracemalloc's peak
# during render, beyond the mask's): soft 3.4, matte 4.5 bytes a pixel; charged rounded up.
_EDGE_BYTES_PER_PIXEL = {"mask": 0, "soft": 4, "matte": 5}


def request_cost(
    width: int,
    height: int,
    *,
    alpha: bool,
    cutout: bool,
    webp: bool = False,
    cutout_alpha: str = "mask",
) -> int:
    """Bytes charged to a request for an image of this size and the answer it asks for
    (``cutout_alpha``: a cut-out's alpha, mask, soft or matte)."""
    per_pixel = _BYTES_PER_PIXEL[alpha, cutout, webp] + _EDGE_BYTES_PER_PIXEL[cutout_alpha]
    return width * height * per_pixel


def upload_cost(declared_length: str | None, limit: int) -> int:
    """Bytes charged while a request's body is read and held: twice its size (the buffer it
    arrives in and the bytes taken out of it, or a multipart body and its image field), from
    ``Content-Length``, or from the most it may be when it has none."""
    size = int(declared_length) if declared_length and declared_length.isdigit() else limit
    return 2 * min(size, limit)


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (the only allocator these calls are for)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError, TypeError):  # musl, macOS: nothing to call
        return None
    return libc


_LIBC = _glibc()
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Left alone, glibc starts at 128 KiB and raises the threshold to the size of each mapped block
# that is freed (up to 32 MiB), after which requests' image buffers come from the heap and stay
# there, fragmented, after they are freed. 2 MiB: the buffers that matter are megabytes, while
# working temporaries below it (the matte's tiles, for one) are reused from the heap
# rather than faulted in afresh. bench.http (U2NETP, 1 and 12 MP, mask and cut-out, 1 and 4
# clients, 3 alternating rounds) measured it within noise of a threshold of 32 MiB, where glibc's
# moving one ends up (1% fewer images/s, geometric mean of the eight cases, each within ±9%); an
# earlier run put 1 MiB 1.4% and 128 KiB 6% behind glibc's moving threshold. Under bench.soak
# (concurrency 8, mixed sizes up to a flat 24 MP PNG) it ran 3.81-3.99 requests/s against
# 4.06-4.27 at 32 MiB, in alternating runs on a machine drifting by 10%: it may cost up to 7%
# there. 8 MiB ran 3.87-4.02, but left 16 MiB behind after the test suite's burst (2 MiB: 1-6).
MMAP_THRESHOLD = 2 * 1024 * 1024
# Setting the threshold also stops glibc's moving trim threshold at its start, 128 KiB: each time
# more than that lies free at a heap's top, the top is given back, so a request's working arrays
# below 2 MiB (the network's input is gathered and blended in 1-2 MiB steps, the map is resized
# back into 1 MiB at 1 MP) were faulted in afresh for each request. A 1 MP mask's codec work
# measured 2.5-4 ms more CPU so (of about 11: the gather and blend 4.9-6.2 against 2.9-3.5 ms,
# the map back 1.9-2.5 against 0.8-0.9); bench.ceiling, 1 MP masks at 16 clients, 20.4 against
# 22.9 ms of CPU an image. 16 MiB kept at each heap's top while requests run is what stops it;
# the budget's idle hook (give_back_memory) returns it all once nothing is held.
TRIM_THRESHOLD = 16 * 1024 * 1024


def give_back_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them in its arenas otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def map_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, given back to
    the OS when it is freed, and keep the threshold there. True if the allocator took it.

    Decoded images, maps and encoded answers are megabytes each and live for one request: so
    mapped, what a burst of large images held is returned when it is answered (measured: the
    RSS after each of eight bursts of 24 requests for 8 MP images moved by up to 61 MiB with
    glibc's moving threshold, by at most 4 MiB with this). Only for engines whose working memory
    is allocated once: PyTorch's CPU kernels allocate tens of megabytes of activations per call,
    which would then be mapped and faulted in on every call (U2NET measured 1.4-1.7x slower).
    A threshold the operator set for glibc in the environment is left as it is (False).

    The heap's top is then kept up to :data:`TRIM_THRESHOLD` while requests run (unless the
    operator set that threshold too), and given back when the budget is idle.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in tunables:
        return False
    if _LIBC is None or _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ and "trim_threshold" not in tunables:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, max(TRIM_THRESHOLD, threshold))
    return True


def limit_arenas(count: int) -> bool:
    """Let at most ``count`` malloc arenas serve the process's threads; True if the allocator
    took it. Call it before the engines start their threads.

    glibc gives threads that allocate at the same time arenas of their own (up to eight a core),
    and memory freed inside an arena's heap goes back to the OS only where the heap's top is free.
    OpenVINO's worker threads so kept what bursts left: over the first three bursts of 24
    requests for 8 MP images (U2NETP, float32) the settled RSS grew by 17-24 MiB each, 57 MiB in
    all, where MNN's single thread kept 1 MiB; with two arenas OpenVINO kept 1 MiB a burst too,
    and its RSS was 90 MiB lower. A limit the operator set for glibc is left as it is (False).
    """
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return _LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, count) == 1


class MemoryBudget:
    """Thread-safe: charges are taken on the event loop or a pool thread and may be released
    from any thread.

    ``retry_after`` gives the seconds to tell a refused client. When the last charge of this
    process is released, ``on_idle`` runs (the service uses it to give freed memory back to the
    OS). ``shared``: with several processes, the bytes each of them holds, in shared memory (a
    ``multiprocessing.Array`` of signed 64-bit integers, one per front, with its lock; this
    process's is ``shared[front]``, so that a front that dies can be forgotten): the budget is
    then the service's, not each process's.
    """

    def __init__(
        self,
        limit_bytes: int,
        *,
        metrics: Metrics,
        retry_after: Callable[[], int],
        on_idle: Callable[[], None] | None = None,
        shared: Any = None,
        front: int = 0,
    ) -> None:
        if limit_bytes < 1:
            raise ValueError(f"the memory budget must be at least 1 byte, not {limit_bytes}")
        self.limit_bytes = limit_bytes
        self._held = 0  # this process's
        self._lock = threading.Lock()
        self._shared = shared
        self._front = front
        self._metrics = metrics
        self._retry_after = retry_after
        self._on_idle = on_idle
        metrics.memory_budget.set(limit_bytes)
        metrics.memory_held.set(0)

    @property
    def held_bytes(self) -> int:
        """What this process's requests hold."""
        return self._held

    def _take(self, cost: int) -> None:
        if cost > self.limit_bytes:
            self._metrics.rejected.labels(reason="image_too_large").inc()
            raise ImageTooLarge(
                f"decoding this image needs about {cost} bytes; the service's memory budget "
                f"is {self.limit_bytes}"
            )
        with self._lock:
            if self._shared is None:
                total = self._held
            else:
                with self._shared.get_lock():
                    total = sum(self._shared[:])
                    if total + cost <= self.limit_bytes:
                        self._shared[self._front] += cost
            if total + cost > self.limit_bytes:
                self._metrics.rejected.labels(reason="memory_full").inc()
                raise QueueFull(
                    f"the images in flight fill the memory budget ({total} of "
                    f"{self.limit_bytes} bytes); retry later",
                    headers={"Retry-After": str(self._retry_after())},
                )
            self._held += cost
            self._metrics.memory_held.set(self._held)

    def _give(self, cost: int) -> None:
        # The request's arrays are gone by now: its kept buffers are unused, beyond any charge.
        self._metrics.kept_buffers.set(scratch.unused_bytes())
        with self._lock:
            self._held -= cost
            held = self._held
            self._metrics.memory_held.set(held)
            if self._shared is not None:
                with self._shared.get_lock():
                    self._shared[self._front] -= cost
        if held == 0 and self._on_idle is not None:
            self._on_idle()

    def charge(self, cost: int) -> Charge:
        """Charge ``cost`` bytes until the charge is released: 413 if it alone exceeds the
        budget, 503 with ``Retry-After`` if it does not fit beside what is held now. For a charge
        taken in one place (a pool thread) and released in another."""
        self._take(cost)
        return Charge(self, cost)

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        """Charge ``cost`` bytes for the block (see :meth:`charge`)."""
        with self.charge(cost):
            yield


class Charge:
    """Bytes held in a :class:`MemoryBudget`; released once, by ``release`` or the block."""

    def __init__(self, budget: MemoryBudget, cost: int) -> None:
        self._budget: MemoryBudget | None = budget
        self.cost = cost

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give(self.cost)

    def __enter__(self) -> Charge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
