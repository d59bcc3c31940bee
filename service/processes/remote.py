"""A front process's way to the inference worker (``U2SERVE_WORKERS`` > 1, see
:mod:`service.processes.supervisor`).

Each front process speaks HTTP, decodes, prepares, finishes and encodes; the one inference
worker runs the batches of every front's requests. They talk over a Unix socket in messages of a
few bytes (:mod:`service.processes.protocol`, which both sides import); the images do not go
through it: each front maps a file of fixed-size slots that the worker maps too, writes a
prepared input into a free slot, and names the slot; the worker reads the input from there and
writes the 8-bit map back into the same slot before it answers. A slot is free again only once
the worker has answered for it.

A worker that goes away (it died, and the supervisor starts another) fails every request waiting
on it with a 503 and ``Retry-After``, at once, and the front connects to the next one as soon as
it listens; meanwhile ``/readyz`` is 503 and new work is refused with 503. Without Redis the map
cache and the kept uploads live in the worker, so that every front sees the same ones; a call
that fails is done without, as with Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import numpy as np

import service.errors
from model.device import CPU, Device
from model.postprocess import finish_on_cpu
from model.preprocess import prepare
from model.weights import SPECS, WeightsSpec
from service.core.admission import Counts, in_flight_limit
from service.core.batcher import Completed
from service.core.cache import Caches
from service.core.pipeline import Served
from service.core.service import Service, Start
from service.errors import NotReady, QueueFull, ServiceError
from service.metrics import Metrics
from service.processes.protocol import Slots, receive, send
from service.processes.shared import Shared, front_slots
from service.settings import Settings
from service.url.fetch import UrlFetcher

__all__ = [
    "RemoteMapCache",
    "RemoteModel",
    "RemoteQueue",
    "RemoteUploadStore",
    "WorkerLink",
    "start_front",
]

log = logging.getLogger("u2serve")


class RemoteModel:
    """A model of the worker's, as a front sees it: its per-image halves run here, on the CPU
    (service/core/infer.py's ``Model``), and its identity names its maps in the cache."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.spec: WeightsSpec = SPECS[description["model"]]
        self._identity: str = description["identity"]
        self._precision: str = description["precision"]

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> Device:
        return CPU

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return prepare(image, self.spec)

    def finish(
        self, levels: np.ndarray, size: tuple[int, int], *, probability: bool, threshold: float
    ) -> np.ndarray:
        return finish_on_cpu(levels, size, probability=probability, threshold=threshold)


class WorkerGone(ServiceError):
    """The inference worker went away with this request; the supervisor is starting another."""

    status, code = 503, "overloaded"


class WorkerLink:
    """A front's connection to the inference worker: requests out, answers in, reconnected
    whenever the worker is started again."""

    def __init__(self, shared: Shared, side: int, slots: int, metrics: Metrics) -> None:
        self.shared = shared
        self.metrics = metrics
        self.slots = Slots(shared.slots_file(os.getpid()), slots, side, create=True)
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.Future[Any], int | None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self.models: dict[str, dict[str, Any]] = {}
        self.infers: dict[str, int] = {}  # requests of each model waiting on the worker

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> dict[str, dict[str, Any]]:
        """Connect (waiting for the worker to listen) and learn its models."""
        await self._connect()
        return self.models

    async def _connect(self) -> None:
        while not self._closed:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.shared.socket))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            send(writer, ("hello", str(self.slots.path), self.slots.count, self.slots.side))
            answer = await receive(reader)
            if answer is None:
                writer.close()
                await asyncio.sleep(0.1)
                continue
            self.models = answer[1]
            self._writer = writer
            self._reading = asyncio.create_task(self._read(reader))
            self._connected.set()
            return

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await receive(reader)) is not None:
            kind, rid, payload = message
            fut, slot = self._pending.pop(rid, (None, None))
            if fut is None:
                continue
            if kind == "ok" and slot is not None:
                # The map is copied out before its slot can be taken by another request.
                payload = (self.slots.levels(slot).copy(), *payload)
            if slot is not None:
                self.slots.give(slot)
            if fut.done():
                continue
            if kind == "ok":
                fut.set_result(payload)
            else:
                name, text, headers = payload
                error = getattr(service.errors, name, ServiceError)
                fut.set_exception(error(text, headers=headers))
        self._lost()

    def _lost(self) -> None:
        """The worker has gone: every request waiting on it is answered now, and the next
        worker is connected to as soon as it listens."""
        self._connected.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending, self._pending = self._pending, {}
        for fut, slot in pending.values():
            if slot is not None:
                self.slots.give(slot)
            if not fut.done():
                fut.set_exception(
                    WorkerGone(
                        "the inference worker restarted while this request waited; retry",
                        headers={"Retry-After": "1"},
                    )
                )
        if not self._closed:
            log.warning("the inference worker went away; reconnecting")
            asyncio.get_running_loop().create_task(self._connect())

    async def call(
        self,
        kind: str,
        *args: Any,
        slot: int | None = None,
        cancelled: asyncio.Future[object] | None = None,
    ) -> Any:
        """Send a message with a new id and wait for its answer; raises the worker's error, or
        503 if the worker is not there. ``slot`` is given back once the worker has answered (or
        gone); ``cancelled``, once done, asks the worker to withdraw the request."""
        if self._writer is None:
            if slot is not None:
                self.slots.give(slot)
            raise WorkerGone(
                "the inference worker is starting; retry", headers={"Retry-After": "1"}
            )
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, slot)
        send(self._writer, (kind, rid, *args))

        def withdraw(_: object) -> None:
            if not fut.done():
                self.cancel(rid)

        if cancelled is not None:
            cancelled.add_done_callback(withdraw)
        try:
            return await fut
        finally:
            if cancelled is not None:
                cancelled.remove_done_callback(withdraw)

    def cancel(self, rid: int) -> None:
        if self._writer is not None:
            send(self._writer, ("cancel", rid))

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        self.slots.close()
        self.slots.path.unlink(missing_ok=True)


class RemoteQueue:
    """A model's queue in the inference worker, as a front uses it (service/core/pipeline.py's
    ``Queue``): the queue limit and ``Retry-After`` are the worker's, read from shared memory."""

    def __init__(
        self, link: WorkerLink, model: str, max_batch_size: int, max_queue: int, metrics: Metrics
    ) -> None:
        self.link, self.model = link, model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._metrics = metrics

    @property
    def depth(self) -> int:
        return int(self.link.shared.depth.value)

    @property
    def idle(self) -> bool:
        return not self.link.infers.get(self.model)

    def retry_after(self) -> int:
        return max(1, int(self.link.shared.retry_after.value))

    def check_capacity(self) -> None:
        if not self.link.connected or not self.link.shared.worker_ready.value:
            self._metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the inference worker is starting", headers={"Retry-After": "1"})
        if self.depth >= self.max_queue:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                f"the queue is full ({self.max_queue} waiting); retry later",
                headers={"Retry-After": str(self.retry_after())},
            )

    async def submit(
        self, item: np.ndarray, deadline: float, *, cancelled: asyncio.Future[object] | None = None
    ) -> Completed[np.ndarray]:
        """Through the worker's queue and network; its errors are raised here as they were
        there (503, 504, 499)."""
        self.check_capacity()
        slot = self.link.slots.take()
        if slot is None:  # more of this front's requests at the worker than it has slots
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                "this process's requests fill its slots; retry later",
                headers={"Retry-After": str(self.retry_after())},
            )
        self.link.slots.input(slot)[...] = item
        infers = self.link.infers
        infers[self.model] = infers.get(self.model, 0) + 1
        try:
            levels, queue_s, infer_s, size = await self.link.call(
                "infer", self.model, slot, deadline, slot=slot, cancelled=cancelled
            )
        finally:
            infers[self.model] -= 1
        return Completed(levels, queue_s, infer_s, size)


class RemoteMapCache:
    """The worker's map cache (service/core/cache's ``MapCache``); done without when it fails."""

    def __init__(self, link: WorkerLink, metrics: Metrics) -> None:
        self.link, self._metrics = link, metrics

    async def get(self, key: str) -> bytes | None:
        try:
            found: bytes | None = await self.link.call("map_get", key)
        except ServiceError:
            self._metrics.cache_fallbacks.labels(operation="map_get").inc()
            return None
        return found

    async def put(self, key: str, levels: bytes) -> None:
        try:
            await self.link.call("map_put", key, levels)
        except ServiceError:
            self._metrics.cache_fallbacks.labels(operation="map_put").inc()


class RemoteUploadStore:
    """The worker's kept uploads (service/core/cache's ``UploadStore``); done without when it
    fails."""

    def __init__(self, link: WorkerLink, metrics: Metrics) -> None:
        self.link, self._metrics = link, metrics

    async def put(self, image_id: str, owner: str, data: bytes) -> bool:
        try:
            kept: bool = await self.link.call("upload_put", image_id, owner, data)
        except ServiceError:
            self._metrics.cache_fallbacks.labels(operation="upload_put").inc()
            return False
        return kept

    async def get(self, image_id: str, owner: str) -> bytes | None:
        try:
            data: bytes | None = await self.link.call("upload_get", image_id, owner)
        except ServiceError:
            self._metrics.cache_fallbacks.labels(operation="upload_get").inc()
            return None
        return data


@contextlib.asynccontextmanager
async def start_front(
    settings: Settings,
    metrics: Metrics,
    shared: Shared,
    *,
    owns_process: bool = False,
    fetcher: UrlFetcher | None = None,
) -> AsyncIterator[Service]:
    """A front process's service: no model of its own, the inference worker's through a link;
    ready once connected, drained and closed on exit like the single process's. Its parts are
    started as the single process's are (:class:`service.core.service.Start`)."""
    s = settings
    async with Start(s, metrics, owns_process=owns_process) as start:
        side = max(SPECS[name].input_size for name in s.served_models)
        link = WorkerLink(shared, side, front_slots(s), metrics)
        start.on_close(link.close)
        described = await link.start()
        worker = Caches(RemoteMapCache(link, metrics), RemoteUploadStore(link, metrics), _none)
        caches = start.caches(worker)
        # One bound over every front's requests, one budget over their bytes: the counts are in
        # memory they share. A front runs no network: its large buffers are the codecs' photos,
        # maps and answers.
        parts = start.answering(
            _served(link, described, s, metrics),
            caches,
            allocates_per_call=False,
            counts=Counts(shared.requests, shared.answered, shared.front),
            held=shared.held,
            front=shared.front,
        )
        worker_ready = shared.worker_ready
        service = Service(
            s, metrics, parts, fetcher=fetcher, worker_ready=lambda: bool(worker_ready.value)
        )
        await start.warm(codecs=parts.codec_pool)  # before the first answer needs them
        start.freeze()
        service.set_ready(True)
        start.on_close(partial(service.drain, s.drain_timeout_s))
        yield service


def _served(
    link: WorkerLink, described: dict[str, dict[str, Any]], settings: Settings, metrics: Metrics
) -> dict[str, Served]:
    """The worker's models as this front's requests see them: their per-image halves here,
    their queues there."""
    names = settings.served_models
    limit = in_flight_limit(settings, max(int(described[name]["max_batch_size"]) for name in names))
    return {
        name: Served(
            RemoteModel(described[name]),
            RemoteQueue(link, name, described[name]["max_batch_size"], limit, metrics),
            {k: v for k, v in described[name].items() if k != "identity"},
        )
        for name in names
    }


async def _none() -> None:
    return None
