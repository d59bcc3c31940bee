"""The app factory: ``create_app(settings)``. Nothing heavy happens at import; the lifespan loads
and verifies the weights, starts the batcher and warms up, and on exit drains and stops."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from model.segmenter import Segmenter, resolve_device
from model.weights import SPECS
from service.batcher import Batcher, QueueGroup
from service.budget import MemoryBudget, give_back_memory, map_large_buffers
from service.cache import open_caches
from service.encode import BOX_HEADERS
from service.errors import Draining, NotReady, ServiceError, error_response
from service.fetch import Resolver, UrlFetcher, system_resolver
from service.infer import Model, run_batch
from service.metrics import Metrics
from service.pipeline import Pipeline, Queue, Ready, Served
from service.settings import Settings
from service.supervisor import Shared, front_slots

__all__ = ["App", "Runtime", "RuntimeDep", "Served", "create_app", "load_segmenter", "url_fetcher"]

log = logging.getLogger("u2serve")


@dataclass(eq=False)
class Runtime:
    """What the routes need, owned by one app: the settings and metrics from the start, the
    loaded service (``pipeline``) once the lifespan has built it."""

    settings: Settings
    owns_process: bool = False
    # A front process's memory shared with the supervisor and the inference worker
    # (U2SERVE_WORKERS > 1); None where this process runs the models itself.
    shared: Shared | None = None
    metrics: Metrics = field(default_factory=Metrics)
    fetcher: UrlFetcher | None = None
    pipeline: Pipeline | None = None
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    _trimming: bool = False

    @property
    def models(self) -> dict[str, Served]:
        """The loaded models, the default one first (none before loading)."""
        return self.pipeline.ready.models if self.pipeline else {}

    @property
    def segmenter(self) -> Model | None:
        """The default model."""
        default = self.models.get(self.settings.default_model)
        return default.segmenter if default else None

    @property
    def batcher(self) -> Queue | None:
        """The default model's batcher."""
        default = self.models.get(self.settings.default_model)
        return default.batcher if default else None

    @property
    def budget(self) -> MemoryBudget | None:
        return self.pipeline.ready.budget if self.pipeline else None

    @property
    def worker_ready(self) -> bool:
        """Whether the models' process is serving: this one, or the inference worker."""
        return self.shared is None or bool(self.shared.worker_ready.value)

    def serving(self) -> Pipeline:
        """The pipeline, while the service takes work; 503 while loading or draining."""
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            raise Draining("the service is shutting down", headers={"Retry-After": "1"})
        if not self.ready or self.pipeline is None or not self.worker_ready:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the model is still loading", headers={"Retry-After": "1"})
        return self.pipeline

    def give_back_memory(self) -> None:
        """Once nothing is held, return the freed heap to the OS, off the event loop."""
        if self.pipeline is not None and not self._trimming:
            self._trimming = True
            self.pipeline.ready.codec_pool.submit(self._trim)

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


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain function dependency in a thread pool, a handoff per request.
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
        threshold=settings.cascade_threshold,
    )


def describe(segmenter: Segmenter, max_batch_size: int) -> dict[str, object]:
    """What ``/readyz`` says of a loaded model."""
    return {
        "model": segmenter.name,
        "engine": segmenter.engine.name,
        "device": str(segmenter.device),
        "dtype": str(segmenter.dtype).removeprefix("torch."),
        "max_batch_size": max_batch_size,
        "precision": segmenter.precision,
        "arithmetic": segmenter.arithmetic,
    }


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
    if rt.shared is not None:
        async with _front(rt, rt.shared):
            yield
        return
    s = rt.settings
    # Every CPU PyTorch operation of the service runs on this one thread: loading, warm-up,
    # batches, and the maps PyTorch finishes on the CPU (service/infer.py). libgomp gives each
    # thread that starts parallel work a team of its own, and once a process has more such
    # threads than CPUs it stops spinning between parallel regions, so the batch thread's
    # operations took twice as long when the model had been loaded on another thread (a 12 MP
    # refine: 110 ms against 68 ms).
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
    if rt.owns_process and not engines_allocate and map_large_buffers():
        log.info("large buffers are mapped, and unmapped when freed")
    codec_pool = ThreadPoolExecutor(s.codec_threads, thread_name_prefix="u2serve-codec")
    # One queue limit for every model: they wait for the same device, on the same thread.
    group = QueueGroup(s.max_queue, rt.metrics)
    models: dict[str, Served] = {}
    batchers: dict[str, Batcher[np.ndarray, np.ndarray]] = {}
    for name, segmenter in segmenters.items():
        max_batch = _batch_size(s, segmenter)
        batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            partial(run_batch, segmenter, second_looks=rt.metrics.second_looks.labels(model=name)),
            max_batch_size=max_batch,
            max_wait_s=s.max_batch_wait_ms / 1000,
            max_queue=s.max_queue,
            metrics=rt.metrics,
            executor=infer,
            group=group,
            model=name,
        )
        batcher.start()
        batchers[name] = batcher
        models[name] = Served(segmenter, batcher, describe(segmenter, max_batch))
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
    caches = open_caches(s, rt.metrics)
    log.info(
        "maps and kept uploads: %s",
        "in Redis (U2SERVE_CACHE_URL)"
        if s.cache_url
        else f"in this process, up to {s.cache_map_bytes / 2**20:g} MiB of maps and "
        f"{s.cache_upload_bytes / 2**20:g} MiB of uploads",
    )
    rt.metrics.queue_capacity.set(s.max_queue)
    budget = MemoryBudget(
        s.memory_budget_bytes,
        metrics=rt.metrics,
        retry_after=models[s.default_model].batcher.retry_after,
        on_idle=rt.give_back_memory,
    )
    rt.pipeline = Pipeline(rt, Ready(models, codec_pool, infer, caches, budget))

    async def warm_up() -> None:
        if s.warmup:
            for name, seg in segmenters.items():
                max_batch = batchers[name].max_batch_size
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
        for batcher in batchers.values():
            await batcher.stop()
        await caches.close()
        infer.shutdown(wait=True)
        codec_pool.shutdown(wait=True)
        log.info("stopped")


@asynccontextmanager
async def _front(rt: Runtime, shared: Shared) -> AsyncIterator[None]:
    """A front process's lifespan: no model of its own, the inference worker's through a link;
    ready once connected, drained on exit like the single process."""
    from service.cache import Caches
    from service.remote import (
        RemoteMapCache,
        RemoteModel,
        RemoteQueue,
        RemoteUploadStore,
        WorkerLink,
    )

    s = rt.settings
    side = max(SPECS[name].input_size for name in s.served_models)
    link = WorkerLink(shared, side, front_slots(s), rt.metrics)
    described = await link.start()
    models = {
        name: Served(
            RemoteModel(described[name]),
            RemoteQueue(link, name, described[name]["max_batch_size"], s.max_queue, rt.metrics),
            {k: v for k, v in described[name].items() if k != "identity"},
        )
        for name in s.served_models
    }
    if s.cache_url:
        caches = open_caches(s, rt.metrics)
    else:  # the worker's, shared by every front
        caches = Caches(
            RemoteMapCache(link, rt.metrics), RemoteUploadStore(link, rt.metrics), _none
        )
    # A front runs no network: its large buffers are the codecs' photos, maps and answers.
    if rt.owns_process and map_large_buffers():
        log.info("large buffers are mapped, and unmapped when freed")
    codec_pool = ThreadPoolExecutor(s.codec_threads, thread_name_prefix="u2serve-codec")
    infer = ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
    budget = MemoryBudget(
        s.memory_budget_bytes,
        metrics=rt.metrics,
        retry_after=models[s.default_model].batcher.retry_after,
        on_idle=rt.give_back_memory,
        shared=shared.held,
    )
    rt.pipeline = Pipeline(rt, Ready(models, codec_pool, infer, caches, budget))
    rt.set_ready(True)
    try:
        yield
    finally:
        await rt.drain(s.drain_timeout_s)
        await caches.close()
        await link.close()
        infer.shutdown(wait=True)
        codec_pool.shutdown(wait=True)


async def _none() -> None:
    return None


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


Endpoint = Callable[[Request, Runtime], Awaitable[Response]]


class App(FastAPI):
    """FastAPI's app, with a shorter way in for the routes every image goes through.

    Their endpoints take the request and the runtime and answer every error themselves
    (``routes.serve``), so the way through FastAPI (its error middleware, exception handlers,
    routing and dependency solving) does nothing for them but cost the event loop: 0.3-0.4 ms
    of its 3.2-4.2 ms a request for a 1 MP mask (``bench/README.md``, section 11), and each
    coroutine of that way is resumed again every time the request's own awaits complete. Such
    a request is matched on its method and path, as FastAPI would match it, and its endpoint is
    called at once; every other request, and every request where middleware was added (CORS)
    or the app is mounted under a root path, goes FastAPI's whole way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct: dict[tuple[str, str], Endpoint] = {}

    def route_directly(self, router: APIRouter, endpoints: Collection[Endpoint]) -> None:
        """Call ``endpoints`` straight from the server, under each method and path that their
        routes in ``router`` (included without a prefix) declare; HEAD stays FastAPI's."""
        self.direct = {
            (method, route.path): route.endpoint
            for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint in endpoints
            for method in route.methods or ()
            if method != "HEAD"
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and not scope.get("root_path") and not self.user_middleware:
            endpoint = self.direct.get((scope["method"], scope["path"]))
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as Starlette sets it: request.app
        response = await endpoint(Request(scope, receive), self.state.runtime)
        await response(scope, receive, send)


def create_app(
    settings: Settings | None = None, *, owns_process: bool = False, shared: Shared | None = None
) -> App:
    """Build the app; the model is loaded when its lifespan starts, not here.

    ``owns_process``: the app is its process's only one (``python -m service``), so it may set
    process-wide state, the C allocator's policy for large buffers, that an embedding process
    (tests, another ASGI host) keeps for itself. ``shared``: the app is a front process of
    several (:mod:`service.supervisor`), whose models run in the inference worker.
    """
    from service.compat import TAGS, document_compat
    from service.pages import install_pages
    from service.routes import DIRECT, document_segment, router

    settings = settings or Settings()
    app = App(
        title="u2serve",
        summary="U²-Net salient-object segmentation over HTTP, with dynamic batching",
        version="0.1.0",
        lifespan=_lifespan,
        openapi_tags=TAGS,
        # Served by install_pages from the package's own files, not from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = Runtime(
        settings, owns_process=owns_process, shared=shared, fetcher=url_fetcher(settings)
    )
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
                # remove.bg's (service/compat/removebg.py)
                "X-Width",
                "X-Height",
                "X-Type",
                "X-Credits-Charged",
            ],
        )
    _install_error_handlers(app)
    app.include_router(router)
    app.route_directly(router, DIRECT)
    install_pages(app)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with what these settings serve: the models, and URL input."""
        if app.openapi_schema is None:
            schema, models = generated(), settings.served_models
            document_segment(schema, models=models, url_input=settings.url_input)
            document_compat(schema, models=models, url_input=settings.url_input)
        return app.openapi_schema or generated()

    app.openapi = openapi  # type: ignore[method-assign]
    return app
