"""The service, built from its settings, without HTTP: what a loaded service is
(:class:`Service`), and how its parts start and close (:class:`Start`), in each kind of process
that runs them (docs/operations/processes.md):

    part                                one process      a front           the inference worker
    the models, on one thread, batched  here             the worker's      here, the queue's
                                                                           depth told to fronts
    the caches: maps, kept uploads      here             the worker's      here
    large buffers mapped                by its engines   yes               no
    codec pool, admission, budget       here             shared            -
    warm-up                             codecs, models   codecs            models
    the collector's freeze              own process      own process       yes

(Redis holds every kind's caches where ``U2SERVE_CACHE_URL`` is set; "shared": admission's counts
and the budget's bytes are in memory the supervisor shares with every front; "own process":
where the service is its process's only one, ``owns_process``.)

:func:`start_service` starts the single process's parts and yields its :class:`Service`, whole;
:func:`service.processes.remote.start_front` starts a front's over the worker's models, and
:func:`service.processes.worker.serve` the worker's, each with a :class:`Start`. The faces (the
HTTP app, the in-process ``u2serve.Remover``) start one of the first two.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np

from model import scratch
from model.segmenter import Segmenter, resolve_device
from service.core.admission import Admission, Counts, in_flight_limit
from service.core.batcher import Batcher, QueueGroup
from service.core.budget import MemoryBudget, give_back_memory, map_large_buffers
from service.core.cache import Caches, open_caches
from service.core.infer import Model, run_batch
from service.core.pipeline import Parts, Pipeline, Queue, Served
from service.errors import Draining, NotReady
from service.images.codecs.maskpng import warm as warm_mask_png
from service.images.matte import warm as warm_matte
from service.metrics import Metrics
from service.settings import Settings
from service.url.fetch import Resolver, UrlFetcher, system_resolver

__all__ = [
    "MemoryReturn",
    "Models",
    "Service",
    "Start",
    "batch_size",
    "describe",
    "freeze_loaded",
    "load_segmenter",
    "start_service",
    "url_fetcher",
    "warm_codecs",
]

log = logging.getLogger("u2serve")


def warm_codecs() -> None:
    """Compile the codecs' passes (or load them from numba's cache) before the first answer asks
    for them: the cut-out's matte and the mask's PNG coder."""
    warm_matte()
    warm_mask_png()


def freeze_loaded() -> None:
    """Leave what the process holds once loaded (modules, models, compiled passes), none of it
    ever garbage, out of the garbage collector's passes, which otherwise walked all of it again
    and again under load (bench/README.md, section 11); ``gc.unfreeze()`` undoes it."""
    gc.collect()
    gc.freeze()


class MemoryReturn:
    """Once nothing is held, returns the freed heap and the kept working buffers to the OS, on a
    codec thread, one at a time."""

    def __init__(self, pool: ThreadPoolExecutor, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._trimming = False

    def __call__(self) -> None:
        if not self._trimming:
            self._trimming = True
            self._pool.submit(self._trim)

    def _trim(self) -> None:
        try:
            scratch.clear()  # the working buffers kept for the next request
            self._metrics.kept_buffers.set(0)
            give_back_memory()
        finally:
            self._trimming = False


class Service:
    """A loaded service: its models, queues and pools (``parts``), the pipeline that answers a
    :class:`~service.core.request.Submission`, and whether it takes work (``is_ready``: once
    warmed up, not while draining). Every field exists once it is built.

    ``fetcher``: the URL fetcher (None where URL input is off), read at each request.
    ``worker_ready``: whether the process that runs the models is serving (this one, or a front's
    inference worker).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        parts: Parts,
        *,
        fetcher: UrlFetcher | None,
        worker_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.parts = parts
        self.fetcher = fetcher
        self._worker_ready = worker_ready
        self.pipeline = Pipeline(self, parts)
        self.is_ready = False
        self.draining = False
        self.inflight = 0

    @property
    def models(self) -> dict[str, Served]:
        """The loaded models, the default one first."""
        return self.parts.models

    @property
    def segmenter(self) -> Model:
        """The default model."""
        return self.models[self.settings.default_model].segmenter

    @property
    def batcher(self) -> Queue:
        """The default model's queue to its network."""
        return self.models[self.settings.default_model].batcher

    def serving(self) -> Pipeline:
        """The pipeline, while the service takes work; 503 while warming up or draining."""
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            raise Draining("the service is shutting down", headers={"Retry-After": "1"})
        if not self.is_ready or not self._worker_ready():
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the model is still loading", headers={"Retry-After": "1"})
        return self.pipeline

    @contextmanager
    def counted(self) -> Iterator[None]:
        """A request in flight for the while: a drain waits for it."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def set_ready(self, ready: bool) -> None:
        self.is_ready = ready
        self.metrics.ready.set(1 if ready else 0)

    async def drain(self, limit_s: float) -> bool:
        """Refuse new work, then wait for accepted work to be answered. True if all was."""
        self.draining = True
        self.set_ready(False)
        end = time.monotonic() + limit_s
        while self.inflight or any(not m.batcher.idle for m in self.models.values()):
            if time.monotonic() >= end:
                log.warning("drain timed out with %d requests in flight", self.inflight)
                return False
            await asyncio.sleep(0.02)
        return True


def load_segmenter(settings: Settings, model: str | None = None) -> Segmenter:
    """One of the settings' models (the default one if None), verified and on its device
    (blocking; seconds)."""
    model = model or settings.default_model
    device = resolve_device(settings.device)
    if settings.require_gpu and device.type != "cuda":
        raise RuntimeError(
            "U2SERVE_REQUIRE_GPU is set but no CUDA device is available "
            f"(U2SERVE_DEVICE={settings.device})"
        )
    return Segmenter(
        model,
        settings.weights_for(model),
        device=str(device),
        dtype=settings.dtype,
        engine=settings.engine,
        channels_last=settings.channels_last,
        threads=settings.threads,
        precision=settings.precision,
        threshold=settings.cascade_threshold,
    )


def describe(segmenter: Segmenter, max_batch_size: int) -> dict[str, object]:
    """What ``/readyz`` says of a loaded model."""
    return {
        "model": segmenter.name,
        "engine": segmenter.engine.name,
        "device": str(segmenter.device),
        "dtype": segmenter.dtype,
        "max_batch_size": max_batch_size,
        "precision": segmenter.precision,
        "arithmetic": segmenter.arithmetic,
    }


def batch_size(settings: Settings, segmenter: Segmenter) -> int:
    """The most images a batch of ``segmenter`` takes under ``settings``."""
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    # On a CPU, oneDNN already spreads one image over every core: larger batches measured no
    # faster per image and only add latency (bench/README.md). A GPU needs batches to be busy.
    return 32 if segmenter.device.type == "cuda" else 1


def url_fetcher(settings: Settings, resolver: Resolver = system_resolver) -> UrlFetcher | None:
    """The fetcher for the ``url`` parameter, or None where URL input is off."""
    if not settings.url_input:
        return None
    return UrlFetcher(
        settings.allow_list,
        connect_timeout_s=settings.url_connect_timeout_s,
        read_timeout_s=settings.url_read_timeout_s,
        total_timeout_s=settings.url_timeout_s,
        resolver=resolver,
    )


@dataclass(frozen=True, eq=False)
class Models:
    """The networks a process runs (the single process, the inference worker): the settings'
    models, loaded on one thread, each with its batcher."""

    infer_pool: ThreadPoolExecutor  # the one thread: loading, warm-up and batches
    segmenters: dict[str, Segmenter]  # the default one first
    batchers: dict[str, Batcher[np.ndarray, np.ndarray]]

    @property
    def allocates_per_call(self) -> bool:
        """Whether an engine allocates its buffers at each call (then the C allocator's policy
        for large buffers is left as it is)."""
        return any(seg.engine.allocates_per_call for seg in self.segmenters.values())

    def served(self) -> dict[str, Served]:
        """Each model as the request's path sees it, with what ``/readyz`` says of it."""
        served = {}
        for name, seg in self.segmenters.items():
            batcher = self.batchers[name]
            served[name] = Served(seg, batcher, describe(seg, batcher.max_batch_size))
        return served


class Start:
    """Starts a process's parts (the table of the module's docstring), each with its close.

    ``async with Start(...) as start:`` then one call a part; on leaving, the closes run in the
    reverse order of the starts (a process's own, given to :meth:`on_close`, among them), then
    the thread pools are shut, once nothing can give them work, then the collector is unfrozen,
    then what :meth:`after_close` was given runs.

    ``owns_process``: the service is its process's only one (``python -m service``, a front, the
    worker), so it may set process-wide state, the C allocator's policy for large buffers and
    what the garbage collector walks (:func:`freeze_loaded`), that an embedding process (tests,
    another ASGI host, ``u2serve.Remover``) keeps for itself.
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, owns_process: bool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.owns_process = owns_process
        self._closes = AsyncExitStack()
        self._pools: list[ThreadPoolExecutor] = []
        self._after: list[Callable[[], object]] = []

    async def __aenter__(self) -> Start:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._closes.__aexit__(kind, exc, tb)
        finally:
            for pool in self._pools:
                pool.shutdown(wait=True)
            if self.owns_process:
                gc.unfreeze()
        for after in self._after:
            after()

    def on_close(self, close: Callable[[], Awaitable[object]]) -> None:
        """Await ``close`` on leaving, before the closes of the parts started before now."""
        self._closes.push_async_callback(close)

    def after_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on leaving, once every part is closed and the pools are shut."""
        self._after.append(callback)

    # -- the parts -----------------------------------------------------------------------------

    def caches(self, worker: Caches | None = None) -> Caches:
        """The map cache and the kept uploads: in Redis where ``U2SERVE_CACHE_URL`` is set, else
        this process's, or in a front ``worker``, the inference worker's, which every front
        shares."""
        if worker is not None and not self.settings.cache_url:
            caches = worker
        else:
            caches = open_caches(self.settings, self.metrics)
        self.on_close(caches.close)
        return caches

    async def models(self, *, on_depth: Callable[[int], None] | None = None) -> Models:
        """The settings' models, loaded, verified and each with its batcher started (stopped on
        leaving, once it has answered what is queued), all under one queue limit; ``on_depth``
        is told every change of the queue's depth."""
        infer, segmenters = await self._load()
        s = self.settings
        # Every model's queue under the one bound of admission: they wait for the same device, on
        # the same thread, and what was admitted is never refused there.
        limit = in_flight_limit(s, max(batch_size(s, seg) for seg in segmenters.values()))
        group = QueueGroup(limit, self.metrics, on_depth=on_depth)
        batchers = {
            name: self._batcher(name, seg, infer, group) for name, seg in segmenters.items()
        }
        self.on_close(partial(_stop, batchers.values()))
        self.metrics.queue_capacity.set(s.max_queue)
        return Models(infer, segmenters, batchers)

    async def _load(self) -> tuple[ThreadPoolExecutor, dict[str, Segmenter]]:
        # The network runs on this one thread: loading, warm-up and batches (MNN's runtime, and
        # on a GPU PyTorch's: libgomp gives each thread that starts parallel work a team of its
        # own, and once a process has more such threads than CPUs it stops spinning between
        # parallel regions, so the batch thread's operations took twice as long when the model
        # had been loaded on another thread).
        infer = ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
        loop = asyncio.get_running_loop()
        segmenters: dict[str, Segmenter] = {}
        try:
            # Bad weights or a missing GPU stop the start-up here, with the loader's message.
            for name in self.settings.served_models:
                segmenters[name] = await loop.run_in_executor(
                    infer, load_segmenter, self.settings, name
                )
        except BaseException:
            infer.shutdown(wait=False)  # nothing else was given to it
            raise
        self._pools.append(infer)
        return infer, segmenters

    def _batcher(
        self, name: str, segmenter: Segmenter, infer: ThreadPoolExecutor, group: QueueGroup
    ) -> Batcher[np.ndarray, np.ndarray]:
        m = self.metrics
        batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            partial(run_batch, segmenter, second_looks=m.second_looks.labels(model=name)),
            max_batch_size=batch_size(self.settings, segmenter),
            max_wait_s=self.settings.max_batch_wait_ms / 1000,
            max_queue=group.max_queue,
            metrics=m,
            executor=infer,
            group=group,
            model=name,
        )
        batcher.start()
        engine, device = segmenter.engine.name, str(segmenter.device)
        m.model_info.labels(name, engine, device, segmenter.dtype).set(1)
        # Each model's series exist from the start, so a hit ratio's rate() has both.
        m.map_cache_hits.labels(model=name)
        m.map_cache_misses.labels(model=name)
        return batcher

    def answering(
        self,
        models: dict[str, Served],
        caches: Caches,
        *,
        allocates_per_call: bool,
        counts: Counts | None = None,
        held: Any = None,
        front: int = 0,
    ) -> Parts:
        """What answers requests over ``models`` (this process's, or the worker's) and
        ``caches``: the codec pool, admission's bound on the requests held and the memory
        budget (which gives memory back once nothing is held), whole. ``allocates_per_call``:
        whether an engine here allocates at each call (:attr:`Models.allocates_per_call`; a
        front runs none). ``counts``, ``held`` and ``front``: in a front, the counts and bytes
        that every front holds, in shared memory, and its own index among them."""
        s = self.settings
        if self.owns_process and not allocates_per_call and map_large_buffers():
            log.info("large buffers are mapped, and unmapped when freed")
        codec_pool = ThreadPoolExecutor(s.codec_threads, thread_name_prefix="u2serve-codec")
        self._pools.append(codec_pool)
        max_batch = max(served.batcher.max_batch_size for served in models.values())
        admission = Admission(in_flight_limit(s, max_batch), self.metrics, counts)
        budget = MemoryBudget(
            s.memory_budget_bytes,
            metrics=self.metrics,
            retry_after=admission.retry_after,
            on_idle=MemoryReturn(codec_pool, self.metrics),
            shared=held,
            front=front,
        )
        return Parts(models, codec_pool, caches, budget, admission)

    async def warm(
        self, *, codecs: ThreadPoolExecutor | None = None, models: Models | None = None
    ) -> None:
        """Where the settings ask for a warm-up: the codecs' compiled passes on ``codecs``, and
        meanwhile each of ``models`` whose engine is not ready at load at the batch sizes it
        will run (1, and on a GPU its largest): the engines let go of the GIL while their
        network runs, so the two overlap."""
        if not self.settings.warmup:
            return
        loop = asyncio.get_running_loop()
        parts = []
        if codecs is not None:
            parts.append(loop.run_in_executor(codecs, warm_codecs))
        if models is not None:
            parts.append(loop.run_in_executor(models.infer_pool, _warm_models, models))
        await asyncio.gather(*parts)

    def freeze(self) -> None:
        """In a process of its own, what it has loaded out of the collector's passes
        (:func:`freeze_loaded`) until leaving."""
        if self.owns_process:
            freeze_loaded()


def _warm_models(models: Models) -> None:
    for name, seg in models.segmenters.items():
        if seg.engine.ready_at_load:
            continue
        max_batch = models.batchers[name].max_batch_size
        seg.warmup(sorted({1, max_batch}) if seg.device.type == "cuda" else [1])


async def _stop(batchers: Iterable[Batcher[Any, Any]]) -> None:
    for batcher in batchers:
        await batcher.stop()


@asynccontextmanager
async def start_service(
    settings: Settings,
    metrics: Metrics,
    *,
    owns_process: bool = False,
    fetcher: UrlFetcher | None = None,
) -> AsyncIterator[Service]:
    """The service of this process, its models loaded here; ready once warmed up (a task of
    its own), drained and closed on exit. ``owns_process``: see :class:`Start`."""
    async with Start(settings, metrics, owns_process=owns_process) as start:
        caches = start.caches()  # closed after the batchers, which may still store maps
        models = await start.models()
        parts = start.answering(
            models.served(), caches, allocates_per_call=models.allocates_per_call
        )
        _log_serving(settings, models)
        service = Service(settings, metrics, parts, fetcher=fetcher)
        warming = asyncio.create_task(_warm_up(start, service, models))
        start.on_close(partial(_drain, service, warming))
        start.after_close(partial(log.info, "stopped"))
        yield service


def _log_serving(settings: Settings, models: Models) -> None:
    for name, seg in models.segmenters.items():
        log.info(
            "serving %s with %s on %s (%s), batches of up to %d",
            name,
            seg.engine.name,
            seg.device,
            seg.dtype,
            models.batchers[name].max_batch_size,
        )
    log.info(
        "maps and kept uploads: %s",
        "in Redis (U2SERVE_CACHE_URL)"
        if settings.cache_url
        else f"in this process, up to {settings.cache_map_bytes / 2**20:g} MiB of maps and "
        f"{settings.cache_upload_bytes / 2**20:g} MiB of uploads",
    )


async def _warm_up(start: Start, service: Service, models: Models) -> None:
    await start.warm(codecs=service.parts.codec_pool, models=models)
    if not service.draining:
        start.freeze()
        service.set_ready(True)


async def _drain(service: Service, warming: asyncio.Task[None]) -> None:
    await service.drain(service.settings.drain_timeout_s)
    warming.cancel()
    await asyncio.gather(warming, return_exceptions=True)
