"""The inference worker of a service with front processes (``U2SERVE_WORKERS`` > 1).

One process per device: it loads the models, runs one :class:`~service.core.batcher.Batcher` per
model over the requests of every front (so a batch fills from all of them), and, without Redis,
keeps the map cache and the uploads behind image ids for all of them. Fronts connect over a Unix
socket (:mod:`service.processes.protocol` has the protocol); their inputs and maps go through the
slot files they map. The queue's depth and ``Retry-After``, and whether it is ready, are written
to memory the supervisor shares with the fronts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from service.core.batcher import Batcher
from service.core.cache import Caches
from service.core.service import Models, Start
from service.errors import ServiceError
from service.metrics import Metrics
from service.processes.protocol import Slots, receive, send
from service.processes.shared import Shared
from service.settings import Settings

__all__ = ["serve"]

log = logging.getLogger("u2serve")


async def serve(settings: Settings, shared: Shared) -> None:
    """Load, warm up, then answer the fronts until SIGTERM; then answer what is queued. Its
    parts are started as the single process's are (:class:`service.core.service.Start`)."""
    metrics = Metrics()
    queue = _QueueReport(shared)
    connections = _Connections()
    async with Start(settings, metrics, owns_process=True) as start:
        caches = start.caches()
        start.on_close(connections.close)  # once the batchers have answered what is queued
        models = await start.models(on_depth=queue.tell)
        queue.retry_after = models.batchers[settings.default_model].retry_after
        for name, seg in models.segmenters.items():
            log.info("serving %s with %s on %s (%s)", name, seg.engine.name, seg.device, seg.dtype)
        await start.warm(models=models)
        start.freeze()
        answers = _Answers(models, caches)
        shared.socket.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(
            partial(connections.serve, answers), str(shared.socket)
        )
        start.on_close(partial(_stop_taking_work, server, shared, metrics))
        start.after_close(partial(_stopped, shared))
        await _ready_until_told_to_stop(shared, metrics)


async def _ready_until_told_to_stop(shared: Shared, metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    shared.worker_ready.value = 1
    metrics.ready.set(1)
    log.info("inference worker ready")
    await stop.wait()


async def _stop_taking_work(server: asyncio.Server, shared: Shared, metrics: Metrics) -> None:
    # The supervisor stops the worker once every front has drained: nothing new comes.
    shared.worker_ready.value = 0
    metrics.ready.set(0)
    server.close()


def _stopped(shared: Shared) -> None:
    with contextlib.suppress(OSError):
        shared.socket.unlink()
    log.info("inference worker stopped")


class _QueueReport:
    """Tells the fronts, in the memory they share, the depth of the worker's queue and the
    default model's ``Retry-After`` (``retry_after``, given once its batcher exists)."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self.retry_after: Callable[[], int] = lambda: 1

    def tell(self, depth: int) -> None:
        self._shared.depth.value = depth
        self._shared.retry_after.value = self.retry_after()


class _Answers:
    """What the worker answers every front with: its models' batchers and descriptions, the
    side of their slots, and its caches."""

    def __init__(self, models: Models, caches: Caches) -> None:
        self.batchers: dict[str, Batcher[Any, Any]] = dict(models.batchers)
        self.side = max(seg.spec.input_size for seg in models.segmenters.values())
        self.descriptions = {
            name: served.info | {"identity": served.segmenter.identity, "model": name}
            for name, served in models.served().items()
        }
        self.caching: dict[str, Callable[..., Any]] = {
            "map_get": caches.maps.get,
            "map_put": caches.maps.put,
            "upload_get": caches.uploads.get,
            "upload_put": caches.uploads.put,
        }


class _Connections:
    """The fronts' connections, each served in a task of its own until the worker stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(
        self, answers: _Answers, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(asyncio.CancelledError):  # the worker stopping under it
            front = await _Front.greet(answers, reader, writer)
            if front is not None:
                await front.serve(reader)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Front:
    """One front's connection: its requests through the batchers (inputs and maps in its
    slots) and to the caches, answered until it goes."""

    def __init__(self, answers: _Answers, slots: Slots, writer: asyncio.StreamWriter) -> None:
        self._answers, self._slots, self._writer = answers, slots, writer
        self._jobs: dict[int, tuple[asyncio.Task[None], asyncio.Future[object]]] = {}
        self._calls: set[asyncio.Task[None]] = set()  # kept, so that none is collected mid-way

    @classmethod
    async def greet(
        cls, answers: _Answers, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Front | None:
        """The front's hello answered with the models, its slots mapped; None (and the
        connection closed) if it is not a front of these models' side."""
        hello = await receive(reader)
        if hello is None or hello[0] != "hello" or hello[3] != answers.side:
            writer.close()
            return None
        slots = Slots(Path(hello[1]), hello[2], answers.side, create=False)
        send(writer, ("models", answers.descriptions))
        return cls(answers, slots, writer)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await receive(reader)) is not None:
                self._take(*message)
                await self._writer.drain()
        finally:
            # The front is gone: what it still has queued is withdrawn; what is in a batch
            # finishes, into the mapping kept until then.
            for _, cancelled in list(self._jobs.values()):
                if not cancelled.done():
                    cancelled.set_result(None)
            await asyncio.gather(*self._calls)
            self._slots.close()
            self._writer.close()

    def _take(self, kind: str, rid: int, *args: Any) -> None:
        if kind == "infer":
            model, slot, deadline = args
            cancelled: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            task = self._spawn(self._infer(rid, model, slot, deadline, cancelled))
            self._jobs[rid] = (task, cancelled)
            task.add_done_callback(partial(self._forget, rid))
        elif kind == "cancel":
            if rid in self._jobs and not self._jobs[rid][1].done():
                self._jobs[rid][1].set_result(None)
        elif kind in self._answers.caching:
            self._spawn(self._answer(rid, self._answers.caching[kind](*args)))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    def _forget(self, rid: int, _: object) -> None:
        self._jobs.pop(rid, None)

    async def _infer(
        self, rid: int, model: str, slot: int, deadline: float, cancelled: asyncio.Future[object]
    ) -> None:
        try:
            done = await self._answers.batchers[model].submit(
                self._slots.input(slot), deadline, cancelled=cancelled
            )
            self._slots.levels(slot)[...] = done.result
            send(self._writer, ("ok", rid, (done.queue_s, done.infer_s, done.batch_size)))
        except ServiceError as exc:
            send(self._writer, ("err", rid, (type(exc).__name__, exc.message, exc.headers)))
        except Exception:
            log.exception("inference failed")
            send(self._writer, ("err", rid, ("ServiceError", "internal error", {})))

    async def _answer(self, rid: int, call: Any) -> None:
        try:
            send(self._writer, ("ok", rid, await call))
        except Exception as exc:
            send(self._writer, ("err", rid, ("ServiceError", f"cache: {exc}", {})))
