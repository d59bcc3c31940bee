"""The app factory: ``create_app(settings)``. Nothing heavy happens at import; the lifespan loads
and verifies the weights, starts the batcher and warms up, and on exit drains and stops."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from model.segmenter import Segmenter, resolve_device
from service.batcher import Batcher, QueueGroup
from service.budget import MemoryBudget, give_back_memory, map_large_buffers
from service.cache import Caches, open_caches
from service.encode import BOX_HEADERS
from service.errors import ServiceError, error_response
from service.fetch import Resolver, UrlFetcher, system_resolver
from service.infer import Job, Segmented, run_batch
from service.metrics import Metrics
from service.settings import Settings

__all__ = ["Runtime", "RuntimeDep", "Served", "create_app", "load_segmenter", "url_fetcher"]

log = logging.getLogger("u2serve")


@dataclass(eq=False)
class Served:
    """One loaded model and the batcher that feeds it."""

    segmenter: Segmenter
    batcher: Batcher[Job, Segmented]


@dataclass(eq=False)
class Runtime:
    """What the routes need, owned by one app."""

    settings: Settings
    owns_process: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, Served] = field(default_factory=dict)  # the default one first
    fetcher: UrlFetcher | None = None
    codec_pool: ThreadPoolExecutor | None = None
    # The thread every torch operation runs on (see _lifespan): batches, and cache hits' resize.
    infer_pool: ThreadPoolExecutor | None = None
    caches: Caches | None = None
    budget: MemoryBudget | None = None
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    _trimming: bool = False

    def __post_init__(self) -> None:
        self.metrics.in_flight.set_function(lambda: self.inflight)

    @property
    def segmenter(self) -> Segmenter | None:
        """The default model."""
        default = self.models.get(self.settings.default_model)
        return default.segmenter if default else None

    @property
    def batcher(self) -> Batcher[Job, Segmented] | None:
        """The default model's batcher."""
        default = self.models.get(self.settings.default_model)
        return default.batcher if default else None

    def give_back_memory(self) -> None:
        """Once nothing is held, return the freed heap to the OS, off the event loop."""
        if self.codec_pool is not None and not self._trimming:
            self._trimming = True
            self.codec_pool.submit(self._trim)

    def _trim(self) -> None:
        try:
            give_back_memory()
        finally:
            self._trimming = False

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
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


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


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
    )


def _batch_size(settings: Settings, segmenter: Segmenter) -> int:
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
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    rt: Runtime = app.state.runtime
    s = rt.settings
    # Every torch operation of the service runs on this one thread: loading, warm-up and batches.
    # libgomp gives each thread that starts parallel work a team of its own, and once a process
    # has more such threads than CPUs it stops spinning between parallel regions, so the batch
    # thread's operations took twice as long when the model had been loaded on another thread
    # (a 12 MP refine: 110 ms against 68 ms).
    rt.infer_pool = infer = ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
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
    if rt.owns_process and not engines_allocate and map_large_buffers():
        log.info("large buffers are mapped, and unmapped when freed")
    rt.codec_pool = ThreadPoolExecutor(s.codec_threads, thread_name_prefix="u2serve-codec")
    # One queue limit for every model: they wait for the same device, on the same thread.
    group = QueueGroup(s.max_queue, rt.metrics)
    for name, segmenter in segmenters.items():
        max_batch = _batch_size(s, segmenter)
        batcher = Batcher(
            partial(run_batch, segmenter),
            max_batch_size=max_batch,
            max_wait_s=s.max_batch_wait_ms / 1000,
            max_queue=s.max_queue,
            metrics=rt.metrics,
            executor=infer,
            group=group,
            model=name,
        )
        batcher.start()
        rt.models[name] = Served(segmenter, batcher)
        dtype = str(segmenter.dtype).removeprefix("torch.")
        engine = segmenter.engine.name
        rt.metrics.model_info.labels(name, engine, str(segmenter.device), dtype).set(1)
        # Each model's series exist from the start, so a hit ratio's rate() has both.
        rt.metrics.map_cache_hits.labels(model=name)
        rt.metrics.map_cache_misses.labels(model=name)
        log.info(
            "serving %s with %s on %s (%s), batches of up to %d",
            name,
            engine,
            segmenter.device,
            dtype,
            max_batch,
        )
    rt.caches = open_caches(s, rt.metrics)
    log.info(
        "maps and kept uploads: %s",
        "in Redis (U2SERVE_CACHE_URL)"
        if s.cache_url
        else f"in this process, up to {s.cache_map_bytes / 2**20:g} MiB of maps and "
        f"{s.cache_upload_bytes / 2**20:g} MiB of uploads",
    )
    rt.metrics.queue_capacity.set(s.max_queue)
    default = rt.models[s.default_model].batcher
    rt.budget = MemoryBudget(
        s.memory_budget_bytes,
        metrics=rt.metrics,
        retry_after=default.retry_after,
        on_idle=rt.give_back_memory,
    )

    async def warm_up() -> None:
        if s.warmup:
            for served in rt.models.values():
                seg, max_batch = served.segmenter, served.batcher.max_batch_size
                sizes = sorted({1, max_batch}) if seg.device.type == "cuda" else [1]
                await loop.run_in_executor(infer, seg.warmup, sizes)
        if not rt.draining:
            rt.set_ready(True)

    warming = asyncio.create_task(warm_up())
    try:
        yield
    finally:
        await rt.drain(s.drain_timeout_s)
        warming.cancel()
        await asyncio.gather(warming, return_exceptions=True)
        for served in rt.models.values():
            await served.batcher.stop()
        await rt.caches.close()
        infer.shutdown(wait=True)
        rt.codec_pool.shutdown(wait=True)
        log.info("stopped")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(422, "invalid_parameter", msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")


def create_app(settings: Settings | None = None, *, owns_process: bool = False) -> FastAPI:
    """Build the app; the model is loaded when its lifespan starts, not here.

    ``owns_process``: the app is its process's only one (``python -m service``), so it may set
    process-wide state, the C allocator's policy for large buffers, that an embedding process
    (tests, another ASGI host) keeps for itself.
    """
    from service.pages import install_pages
    from service.routes import document_segment, router

    settings = settings or Settings()
    app = FastAPI(
        title="u2serve",
        summary="U²-Net salient-object segmentation over HTTP, with dynamic batching",
        version="0.1.0",
        lifespan=_lifespan,
        # Served by install_pages from the package's own files, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = Runtime(settings, owns_process=owns_process, fetcher=url_fetcher(settings))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "X-Image-Id",
                "Server-Timing",
                "Retry-After",
                *BOX_HEADERS,
            ],
        )
    _install_error_handlers(app)
    app.include_router(router)
    install_pages(app)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with what these settings serve: the models, and ``url``."""
        if app.openapi_schema is None:
            document_segment(
                generated(), models=settings.served_models, url_input=settings.url_input
            )
        return app.openapi_schema or generated()

    app.openapi = openapi  # type: ignore[method-assign]
    return app
