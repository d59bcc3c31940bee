"""A request's path, from what the route read to the answer's bytes:

    the image's bytes (the upload, a fetch by URL, or the upload kept under an image id)
    → decoded and prepared for the network (one trip to the codec pool)
    → its 8-bit network map (from the map cache, or through the model's batch)
    → the answer (one trip to the codec pool: the map resized back, thresholded, encoded)

``routes.py`` speaks HTTP: it reads the request into a :class:`~service.core.request.Submission`,
calls :meth:`Pipeline.answer` and writes what it returns. What one request carries through the
stages is one :class:`RequestContext`; what exists once the service is loaded is one
:class:`Parts`, built whole before the first request.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from service.core.access import AccessRecord
from service.core.admission import Admission, PoolStage
from service.core.batcher import Completed
from service.core.budget import Charge, MemoryBudget, request_cost, upload_cost
from service.core.cache import Caches, digest, map_key, new_image_id
from service.core.infer import Model, finish
from service.core.request import Submission
from service.core.scale import decode_tag, reduction
from service.errors import ImageNotFound, ImageTooLarge, NotReady, ServiceError
from service.images.decode import DecodedImage, decode, read_header
from service.images.encode import Rendered, render
from service.params import SegmentParams

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.settings import Settings
    from service.url.fetch import UrlFetcher

__all__ = ["Owner", "Parts", "Pipeline", "Queue", "RequestContext", "Served", "Stage"]


class Queue(Protocol):
    """A model's way to its network: the :class:`~service.core.batcher.Batcher` in this process, or
    the inference worker's, reached from a front process (:mod:`service.processes.remote`)."""

    max_batch_size: int

    @property
    def depth(self) -> int: ...

    @property
    def idle(self) -> bool: ...

    def check_capacity(self) -> None: ...

    def retry_after(self) -> int: ...

    async def submit(
        self, item: np.ndarray, deadline: float, *, cancelled: asyncio.Future[object] | None = None
    ) -> Completed[np.ndarray]: ...


class Owner(Protocol):
    """What the pipeline reads of the service that owns it (:class:`service.core.service.Service`):
    its settings and metrics, and the URL fetcher of the moment (None where URL input is off)."""

    settings: Settings
    metrics: Metrics
    fetcher: UrlFetcher | None


@dataclass(frozen=True, eq=False)
class Served:
    """One model as the request's path sees it: its per-image halves (``segmenter``: a loaded
    :class:`~model.segmenter.Segmenter`, or in a front process its description), the queue to
    its network, and what ``/readyz`` says of it."""

    segmenter: Model
    batcher: Queue
    info: dict[str, object]


@dataclass(frozen=True, eq=False)
class Parts:
    """The parts a loaded service answers with: built whole before the first request
    (:meth:`service.core.service.Start.answering`), so that code past readiness never asks
    whether a part exists yet."""

    models: dict[str, Served]  # the default one first
    codec_pool: ThreadPoolExecutor
    caches: Caches
    budget: MemoryBudget
    admission: Admission


@dataclass(frozen=True)
class Stage:
    """One stage of a request, timed: an entry of its ``Server-Timing`` header and a
    ``<name>_ms`` field of its access line (``routes.serve`` writes both)."""

    name: str
    seconds: float
    description: str | None = None


@dataclass(eq=False)
class RequestContext:
    """What one request carries through the stages: its access record, its stages in the order
    they ran (for ``Server-Timing`` and the access log), when it began, whose it is (the API
    key's digest, which owns its image id) and a future that completes if its client goes
    away."""

    record: AccessRecord
    start: float
    owner: str = ""
    received: float = 0.0  # when its body began to be read
    disconnected: asyncio.Future[None] | None = None
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str, since: float, description: str | None = None) -> float:
        """Record a stage that began at ``since``; returns its seconds."""
        seconds = time.monotonic() - since
        self.stages.append(Stage(name, seconds, description))
        return seconds


@dataclass(frozen=True, eq=False)
class _Decoded:
    """What the first trip to the codec pool gives back: the photo, the network's input, the
    bytes' digest, and the memory charged for the photo until its answer exists."""

    image: DecodedImage
    prepared: np.ndarray
    digest: str
    charge: Charge


class Pipeline:
    """Runs a :class:`~service.core.request.Submission` through the stages to its answer."""

    def __init__(self, owner: Owner, parts: Parts) -> None:
        self.owner = owner
        self.parts = parts
        self.settings = owner.settings
        self.metrics = metrics = owner.metrics
        self._rejected = metrics.rejected
        self._stage = {
            name: metrics.stage_duration.labels(stage=name)
            for name in ("fetch", "decode", "encode")
        }
        # The trips to a pool, each under the request's deadline: the decode, and the answer.
        self._decoding = PoolStage(parts.codec_pool, "decode", metrics)
        self._encoding = PoolStage(parts.codec_pool, "encode", metrics)
        # Each model's cache counters, looked up once rather than per request.
        self._cache_hits = {m: metrics.map_cache_hits.labels(model=m) for m in parts.models}
        self._cache_misses = {m: metrics.map_cache_misses.labels(model=m) for m in parts.models}

    def admit(self) -> None:
        """Count a request in, or 503 now if the service holds as many as it may, before any
        work is spent on the upload; each admitted request is released once (:meth:`release`)."""
        self.parts.admission.admit()

    def release(self) -> None:
        """Count an admitted request out: its answer's bytes exist, or it failed."""
        self.parts.admission.release()

    def deadline(self, ctx: RequestContext) -> float:
        """When ``ctx``'s request must be answered by, in every stage (``time.monotonic()``)."""
        return ctx.start + self.settings.request_timeout_s

    def reject(self, exc: ServiceError) -> None:
        """Count a request refused before inference, by its error's code."""
        self._rejected.labels(reason=exc.code).inc()

    async def answer(self, sub: Submission, ctx: RequestContext) -> Rendered:
        """The answer for a request, with its ``X-Image-Id`` where its image could be kept."""
        ctx.record.output = sub.params.output
        ctx.record.model = model = sub.model or self.settings.default_model
        budget = self.parts.budget
        if sub.image_id is not None:
            ctx.record.source = "image_id"
            kept = await self._kept_upload(sub.image_id, ctx.owner)
            ctx.stage("upload", ctx.received)
            # Charged as the upload it stands for: a copy from Redis is as large.
            with budget.hold(len(kept)):
                return await self._from_bytes(kept, sub, model, ctx, sub.image_id)
        ctx.stage("upload", ctx.received)
        if sub.url is None:
            if sub.image is None:
                raise ValueError("a submission without an image, a url or an image id")
            ctx.record.source = "upload"
            ctx.record.bytes_in = len(sub.image)
            return await self._from_bytes(sub.image, sub, model, ctx)
        ctx.record.source = "url"
        # Charged as an upload of undeclared length is: the most its body may be, twice.
        with budget.hold(upload_cost(None, self.settings.max_upload_bytes)):
            data = await self._fetch(sub.url, ctx)
            ctx.record.bytes_in = len(data)
            # The fetched bytes are the upload: they get an image id and a map like any other.
            return await self._from_bytes(data, sub, model, ctx)

    # -- the image's bytes -------------------------------------------------------------------

    async def _fetch(self, url: str, ctx: RequestContext) -> bytes:
        """The image's bytes from ``url``, its header judged against the pixel limit as soon
        as it has arrived."""
        fetcher = self.owner.fetcher
        if fetcher is None:  # upload.py refuses a url where URL input is off
            raise NotReady("this service does not fetch images by URL")
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_pixels
        pool = self.parts.codec_pool

        def complete(prefix: bytes) -> bool:
            try:
                read_header(prefix, max_pixels=max_pixels)
            except ImageTooLarge:
                raise
            except ServiceError:
                return False  # not enough of the file yet, or no image: the whole body decides
            return True

        async def probe(prefix: bytes) -> bool:
            return await loop.run_in_executor(pool, complete, prefix)

        t = time.monotonic()
        try:
            fetched = await fetcher.fetch(
                url, max_bytes=self.settings.max_upload_bytes, probe=probe
            )
        except ServiceError as exc:
            self.reject(exc)
            raise
        self._stage["fetch"].observe(ctx.stage("fetch", t))
        return fetched.data

    async def _kept_upload(self, image_id: str, owner: str) -> bytes:
        """The bytes kept under an image id for this API key; 404 telling the client to upload
        again when there are none (unknown, expired, evicted, another key's, or Redis is
        down)."""
        data = await self.parts.caches.uploads.get(image_id, owner)
        if data is not None:
            self.metrics.image_id_requests.labels(result="found").inc()
            return data
        self.metrics.image_id_requests.labels(result="not_found").inc()
        exc = ImageNotFound(
            f"no image with this id here: ids are kept for {self.settings.cache_upload_ttl_s} s "
            "after their last use (fewer when the cache is full) and only for the API key that "
            "uploaded them; upload the image again"
        )
        self.reject(exc)
        raise exc

    # -- bytes → answer ----------------------------------------------------------------------

    def _decode(
        self, data: bytes, params: SegmentParams, segmenter: Model, record: AccessRecord
    ) -> _Decoded:
        """In the codec pool: the header (the size limit, and the memory charge for the pixels
        before any is decoded), the digest, the decode and the network's input."""
        try:
            header = read_header(data, max_pixels=self.settings.max_pixels)
        except ServiceError as exc:
            self.reject(exc)
            raise
        record.size = (header.width, header.height)
        cost = request_cost(
            header.width,
            header.height,
            alpha=header.alpha,
            cutout=params.output == "cutout",
            webp=params.format == "webp",
            cutout_alpha=params.cutout_alpha or "mask",
        )
        charge = self.parts.budget.charge(cost)  # counts its own refusals
        try:
            reduce = reduction(segmenter.precision, params, segmenter.spec.input_size)
            image = decode(data, max_pixels=self.settings.max_pixels, header=header, reduce=reduce)
            return _Decoded(image, segmenter.prepare(image.model_rgb), digest(data), charge)
        except ServiceError as exc:
            charge.release()
            self.reject(exc)
            raise
        except BaseException:
            charge.release()
            raise

    async def _from_bytes(
        self,
        data: bytes,
        sub: Submission,
        model: str,
        ctx: RequestContext,
        image_id: str | None = None,
    ) -> Rendered:
        """The answer for an image's bytes; a new upload (or a URL's bytes) is kept under a new
        image id, one given by ``image_id`` keeps its id."""
        params = sub.params
        served, caches = self.parts.models[model], self.parts.caches
        t = time.monotonic()
        got = await self._decoding.run(
            self.deadline(ctx),
            ctx.disconnected,
            self._decode,
            data,
            params,
            served.segmenter,
            ctx.record,
        )
        # The arrays are gone when this returns, before the charge is released.
        with got.charge:
            self._stage["decode"].observe(ctx.stage("decode", t))
            keeping = None
            if image_id is None:  # a new upload, kept under a new id while the answer is made
                image_id = new_image_id()
                keeping = asyncio.ensure_future(caches.uploads.put(image_id, ctx.owner, data))
            image = got.image
            tag = decode_tag((image.rgb.shape[1], image.rgb.shape[0]), image.full)
            key = map_key(served.segmenter.identity + tag, got.digest)
            levels, storing = await self._levels(served, model, key, got.prepared, ctx)
            t = time.monotonic()
            answer = await self._render(
                served.segmenter, levels, got.image, params, sub.max_pixels, ctx
            )
            self._stage["encode"].observe(ctx.stage("encode", t))
            if storing is not None:  # kept before the answer, so any replica may be asked next
                await storing
        if keeping is None or await keeping:  # an upload that could not be kept has no id
            answer.headers["X-Image-Id"] = image_id
        return answer

    async def _levels(
        self, served: Served, model: str, key: str, prepared: np.ndarray, ctx: RequestContext
    ) -> tuple[np.ndarray, asyncio.Future[None] | None]:
        """The photo's ``S×S`` network map: from the map cache, or through the model's batch
        (then stored in the cache, by the future returned)."""
        side = served.segmenter.spec.input_size
        t = time.monotonic()
        cached = await self.parts.caches.maps.get(key)
        if cached is not None and len(cached) == side * side:
            # A hit: no queue and no network; the map's second half runs as a miss's does.
            ctx.record.cache = "hit"
            self._cache_hits[model].inc()
            ctx.stage("cache", t, "hit")
            return np.frombuffer(cached, dtype=np.uint8).reshape(side, side), None
        ctx.record.cache = "miss"
        self._cache_misses[model].inc()
        ctx.stage("cache", t, "miss")
        done = await self._infer(served.batcher, prepared, ctx)
        ctx.stages.append(Stage("queue", done.queue_s))
        # Under precision auto, the arithmetic that made this map (service.core.infer.Levels).
        made = f", {made}" if (made := getattr(done.result, "arithmetic", "")) else ""
        ctx.stages.append(Stage("infer", done.infer_s, f"batch of {done.batch_size}{made}"))
        ctx.record.batch_size = done.batch_size
        storing = asyncio.ensure_future(self.parts.caches.maps.put(key, done.result.tobytes()))
        return done.result, storing

    async def _infer(
        self, batcher: Queue, prepared: np.ndarray, ctx: RequestContext
    ) -> Completed[np.ndarray]:
        """Through the queue and the network; withdrawn if the client goes away while queued."""
        deadline = self.deadline(ctx)
        return await batcher.submit(prepared, deadline, cancelled=ctx.disconnected)  # type: ignore[arg-type]

    async def _render(
        self,
        segmenter: Model,
        levels: np.ndarray,
        image: DecodedImage,
        params: SegmentParams,
        max_pixels: int | None,
        ctx: RequestContext,
    ) -> Rendered:
        """The map resized back, through the alpha stage and encoded: one trip to the codec
        pool, withdrawn, as the decode is, if its deadline passes while it waits."""
        return await self._encoding.run(
            self.deadline(ctx),
            ctx.disconnected,
            _finish_and_render,
            segmenter,
            levels,
            image,
            params,
            max_pixels,
        )


def _finish_and_render(
    segmenter: Model,
    levels: np.ndarray,
    image: DecodedImage,
    params: SegmentParams,
    max_pixels: int | None,
) -> Rendered:
    size = (image.size[1], image.size[0])  # the photo's, where it was decoded smaller
    levels = finish(segmenter, levels, image.model_rgb, params, size=size)
    return render(levels, image, params, max_pixels=max_pixels)
