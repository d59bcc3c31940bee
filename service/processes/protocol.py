"""What a front and the inference worker say to each other (``U2SERVE_WORKERS`` > 1): both sides
import it from here, the front (:mod:`service.processes.remote`) and the worker
(:mod:`service.processes.worker`).

They talk over a Unix socket in messages of a few bytes, each a pickled tuple framed by its
length (:func:`send`, :func:`receive`); the images do not go through it but through
:class:`Slots`, a file that both map. The messages:

    front → worker                          worker → front
    ("hello", slots file, slots, side)      ("models", {name: its description})
    ("infer", id, model, slot, deadline)    ("ok", id, (queue_s, infer_s, batch size)), the
                                            8-bit map written into the slot first
    ("cancel", id)                          none: a request still queued is withdrawn, and its
                                            "infer" answered as an error
    ("map_get", id, key), ("map_put", …),   ("ok", id, what the worker's cache returned)
    ("upload_get", …), ("upload_put", …)
                                            ("err", id, (the error's class, message,
                                            headers)), to any of them

A slot is free again only once the worker has answered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Slots", "receive", "send"]

_HEADER = struct.Struct("!I")


def send(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    """One message, framed by its length. Between the processes of one service only."""
    if writer.is_closing():
        return
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message; None once the other side has gone."""
    try:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


class Slots:
    """Fixed-size places in a file that a front and the worker both map: a prepared
    ``3×S×S`` float32 input, then the ``S×S`` uint8 map."""

    def __init__(self, path: Path, count: int, side: int, *, create: bool) -> None:
        self.path, self.count, self.side = path, count, side
        self.input_bytes = 3 * side * side * 4
        self.stride = self.input_bytes + side * side
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, count * self.stride)
            self._map = mmap.mmap(fd, count * self.stride)
        finally:
            os.close(fd)
        self._free = list(range(count)) if create else []

    def input(self, slot: int) -> np.ndarray:
        return np.ndarray(
            (3, self.side, self.side), np.float32, self._map, offset=slot * self.stride
        )

    def levels(self, slot: int) -> np.ndarray:
        return np.ndarray(
            (self.side, self.side),
            np.uint8,
            self._map,
            offset=slot * self.stride + self.input_bytes,
        )

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes with them
            self._map.close()
