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
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model.segmenter import Segmenter
from service.core.admission import in_flight_limit
from service.core.batcher import Batcher, QueueGroup
from service.core.cache import open_caches
from service.core.infer import run_batch
from service.core.service import freeze_loaded
from service.errors import ServiceError
from service.metrics import Metrics
from service.processes.protocol import Slots, receive, send
from service.processes.shared import Shared
from service.settings import Settings

__all__ = ["serve"]

log = logging.getLogger("u2serve")


def _description(name: str, segmenter: Segmenter, max_batch: int) -> dict[str, Any]:
    from service.core.service import describe

    return describe(segmenter, max_batch) | {"identity": segmenter.identity, "model": name}


async def serve(settings: Settings, shared: Shared) -> None:
    """Load, warm up, then answer the fronts until SIGTERM; then answer what is queued."""
    from service.core.service import batch_size, load_segmenter

    loop = asyncio.get_running_loop()
    metrics = Metrics()
    # Every PyTorch operation of the worker on one thread, as in the single-process service.
    infer = ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
    segmenters = {
        name: await loop.run_in_executor(infer, load_segmenter, settings, name)
        for name in settings.served_models
    }
    batchers: dict[str, Batcher[np.ndarray, np.ndarray]] = {}

    def tell(depth: int) -> None:
        shared.depth.value = depth
        shared.retry_after.value = batchers[settings.default_model].retry_after()

    # The fronts admit requests under one bound (service/core/admission.py); the queue never holds
    # more than they admitted, so it refuses none of them.
    limit = in_flight_limit(settings, max(batch_size(settings, seg) for seg in segmenters.values()))
    group = QueueGroup(limit, metrics, on_depth=tell)
    descriptions = {}
    for name, seg in segmenters.items():
        max_batch = batch_size(settings, seg)
        batchers[name] = Batcher(
            partial(run_batch, seg, second_looks=metrics.second_looks.labels(model=name)),
            max_batch_size=max_batch,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=limit,
            metrics=metrics,
            executor=infer,
            group=group,
            model=name,
        )
        batchers[name].start()
        descriptions[name] = _description(name, seg, max_batch)
        dtype = seg.dtype
        metrics.model_info.labels(name, seg.engine.name, str(seg.device), dtype).set(1)
        metrics.map_cache_hits.labels(model=name)
        metrics.map_cache_misses.labels(model=name)
        log.info("serving %s with %s on %s (%s)", name, seg.engine.name, seg.device, dtype)
    metrics.queue_capacity.set(settings.max_queue)
    caches = open_caches(settings, metrics)
    if settings.warmup:
        for name, seg in segmenters.items():
            sizes = sorted({1, batchers[name].max_batch_size}) if seg.device.type == "cuda" else [1]
            await loop.run_in_executor(infer, seg.warmup, sizes)
    freeze_loaded()
    side = max(seg.spec.input_size for seg in segmenters.values())

    handlers: set[asyncio.Task[Any]] = set()

    async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
            task.add_done_callback(handlers.discard)
        with contextlib.suppress(asyncio.CancelledError):  # the worker stopping under it
            await serve_front(reader, writer)

    async def serve_front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await receive(reader)
        if hello is None or hello[0] != "hello" or hello[3] != side:
            writer.close()
            return
        slots = Slots(Path(hello[1]), hello[2], side, create=False)
        send(writer, ("models", descriptions))
        jobs: dict[int, tuple[asyncio.Task[None], asyncio.Future[object]]] = {}

        async def infer_one(
            rid: int, model: str, slot: int, deadline: float, cancelled: asyncio.Future[object]
        ) -> None:
            try:
                done = await batchers[model].submit(
                    slots.input(slot), deadline, cancelled=cancelled
                )
                slots.levels(slot)[...] = done.result
                send(writer, ("ok", rid, (done.queue_s, done.infer_s, done.batch_size)))
            except ServiceError as exc:
                send(writer, ("err", rid, (type(exc).__name__, exc.message, exc.headers)))
            except Exception:
                log.exception("inference failed")
                send(writer, ("err", rid, ("ServiceError", "internal error", {})))

        async def answer(rid: int, call: Any) -> None:
            try:
                send(writer, ("ok", rid, await call))
            except Exception as exc:
                send(writer, ("err", rid, ("ServiceError", f"cache: {exc}", {})))

        calls: set[asyncio.Task[None]] = set()  # kept, so that none is collected mid-way

        def spawn(coro: Any) -> asyncio.Task[None]:
            task: asyncio.Task[None] = asyncio.create_task(coro)
            calls.add(task)
            task.add_done_callback(calls.discard)
            return task

        def forget(rid: int) -> Callable[[object], None]:
            return lambda _: jobs.pop(rid, None) and None

        caching: dict[str, Callable[..., Any]] = {
            "map_get": caches.maps.get,
            "map_put": caches.maps.put,
            "upload_get": caches.uploads.get,
            "upload_put": caches.uploads.put,
        }
        try:
            while (message := await receive(reader)) is not None:
                kind, rid, *args = message
                if kind == "infer":
                    model, slot, deadline = args
                    cancelled: asyncio.Future[object] = loop.create_future()
                    task = spawn(infer_one(rid, model, slot, deadline, cancelled))
                    jobs[rid] = (task, cancelled)
                    task.add_done_callback(forget(rid))
                elif kind == "cancel":
                    if rid in jobs and not jobs[rid][1].done():
                        jobs[rid][1].set_result(None)
                elif kind in caching:
                    spawn(answer(rid, caching[kind](*args)))
                await writer.drain()
        finally:
            # The front is gone: what it still has queued is withdrawn; what is in a batch
            # finishes, into the mapping kept until then.
            for _, cancelled in list(jobs.values()):
                if not cancelled.done():
                    cancelled.set_result(None)
            await asyncio.gather(*calls)
            slots.close()
            writer.close()

    shared.socket.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(front, str(shared.socket))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    shared.worker_ready.value = 1
    metrics.ready.set(1)
    log.info("inference worker ready")
    await stop.wait()
    # The supervisor stops the worker once every front has drained: nothing new comes.
    shared.worker_ready.value = 0
    metrics.ready.set(0)
    server.close()
    for batcher in batchers.values():
        await batcher.stop()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await caches.close()
    infer.shutdown(wait=True)
    with contextlib.suppress(OSError):
        shared.socket.unlink()
    log.info("inference worker stopped")
