"""The service, built from its settings, without HTTP: :func:`start_service` loads and verifies
the models, starts their batchers, makes the codec pool, the caches, the memory budget and the
admission bound, warms up, and on exit drains and closes; what it yields is one
:class:`Service`, whole. The faces (the HTTP app, the in-process ``u2serve.Remover``, the
command) each start one, or, in a front process, :func:`service.processes.remote.start_front`
builds it over the inference worker's models.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from functools import partial

import numpy as np

from model import scratch
from model.segmenter import Segmenter, resolve_device
from service.core.admission import Admission, in_flight_limit
from service.core.batcher import Batcher, QueueGroup
from service.core.budget import MemoryBudget, give_back_memory, map_large_buffers
from service.core.cache import open_caches
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
    "Service",
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


@asynccontextmanager
async def start_service(
    settings: Settings,
    metrics: Metrics,
    *,
    owns_process: bool = False,
    fetcher: UrlFetcher | None = None,
) -> AsyncIterator[Service]:
    """The service of this process, its models loaded here; ready once warmed up (a task of
    its own), drained and closed on exit.

    ``owns_process``: the service is its process's only one (``python -m service``), so it may
    set process-wide state, the C allocator's policy for large buffers and what the garbage
    collector walks (:func:`freeze_loaded`), that an embedding process (tests, another ASGI
    host, ``u2serve.Remover``) keeps for itself.
    """
    s = settings
    # The network runs on this one thread: loading, warm-up and batches (MNN's runtime, and
    # on a GPU PyTorch's: libgomp gives each thread that starts parallel work a team of its own,
    # and once a process has more such threads than CPUs it stops spinning between parallel
    # regions, so the batch thread's operations took twice as long when the model had been
    # loaded on another thread).
    infer = ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
    loop = asyncio.get_running_loop()
    segmenters: dict[str, Segmenter] = {}
    try:
        # Bad weights or a missing GPU stop the start-up here, with the loader's message.
        for name in s.served_models:
            segmenters[name] = await loop.run_in_executor(infer, load_segmenter, s, name)
    except BaseException:
        infer.shutdown(wait=False)
        raise
    engines_allocate = any(seg.engine.allocates_per_call for seg in segmenters.values())
    if owns_process and not engines_allocate and map_large_buffers():
        log.info("large buffers are mapped, and unmapped when freed")
    codec_pool = ThreadPoolExecutor(s.codec_threads, thread_name_prefix="u2serve-codec")
    max_batch = max(batch_size(s, seg) for seg in segmenters.values())
    admission = Admission(in_flight_limit(s, max_batch), metrics)
    # Every model's queue under the one bound of admission: they wait for the same device, on
    # the same thread, and what was admitted is never refused there.
    group = QueueGroup(admission.limit, metrics)
    models: dict[str, Served] = {}
    batchers: dict[str, Batcher[np.ndarray, np.ndarray]] = {}
    for name, segmenter in segmenters.items():
        max_batch = batch_size(s, segmenter)
        batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            partial(run_batch, segmenter, second_looks=metrics.second_looks.labels(model=name)),
            max_batch_size=max_batch,
            max_wait_s=s.max_batch_wait_ms / 1000,
            max_queue=admission.limit,
            metrics=metrics,
            executor=infer,
            group=group,
            model=name,
        )
        batcher.start()
        batchers[name] = batcher
        models[name] = Served(segmenter, batcher, describe(segmenter, max_batch))
        engine = segmenter.engine.name
        metrics.model_info.labels(name, engine, str(segmenter.device), segmenter.dtype).set(1)
        # Each model's series exist from the start, so a hit ratio's rate() has both.
        metrics.map_cache_hits.labels(model=name)
        metrics.map_cache_misses.labels(model=name)
        log.info(
            "serving %s with %s on %s (%s), batches of up to %d",
            name,
            engine,
            segmenter.device,
            segmenter.dtype,
            max_batch,
        )
    caches = open_caches(s, metrics)
    log.info(
        "maps and kept uploads: %s",
        "in Redis (U2SERVE_CACHE_URL)"
        if s.cache_url
        else f"in this process, up to {s.cache_map_bytes / 2**20:g} MiB of maps and "
        f"{s.cache_upload_bytes / 2**20:g} MiB of uploads",
    )
    metrics.queue_capacity.set(s.max_queue)
    budget = MemoryBudget(
        s.memory_budget_bytes,
        metrics=metrics,
        retry_after=admission.retry_after,
        on_idle=MemoryReturn(codec_pool, metrics),
    )
    parts = Parts(models, codec_pool, infer, caches, budget, admission)
    service = Service(s, metrics, parts, fetcher=fetcher)

    async def warm_up() -> None:
        if s.warmup:
            await loop.run_in_executor(codec_pool, warm_codecs)
            for name, seg in segmenters.items():
                max_batch = batchers[name].max_batch_size
                sizes = sorted({1, max_batch}) if seg.device.type == "cuda" else [1]
                await loop.run_in_executor(infer, seg.warmup, sizes)
        if not service.draining:
            if owns_process:
                freeze_loaded()
            service.set_ready(True)

    warming = asyncio.create_task(warm_up())
    try:
        yield service
    finally:
        await service.drain(s.drain_timeout_s)
        warming.cancel()
        await asyncio.gather(warming, return_exceptions=True)
        for batcher in batchers.values():
            await batcher.stop()
        await caches.close()
        infer.shutdown(wait=True)
        codec_pool.shutdown(wait=True)
        if owns_process:
            gc.unfreeze()
        log.info("stopped")
