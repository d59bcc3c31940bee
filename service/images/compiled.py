"""numba's ``njit`` as the image passes use it: without the GIL, cached on disk where it can be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from numba import njit

__all__ = ["compiled"]

F = TypeVar("F", bound=Callable[..., Any])


def compiled(**options: Any) -> Callable[[F], F]:
    """numba's ``njit`` without the GIL, with fastmath, and with its cache on disk where numba
    finds a writable place for it (beside this file, ``NUMBA_CACHE_DIR``, the user's cache
    folder). Where it finds none (a read-only file system: numba then refuses the function
    outright), the function is compiled in each process, a few seconds, at warm-up."""

    def wrap(f: F) -> F:
        try:
            return njit(cache=True, nogil=True, fastmath=True, **options)(f)
        except RuntimeError as e:
            if "cannot cache" not in str(e):
                raise
            return njit(nogil=True, fastmath=True, **options)(f)

    return wrap
