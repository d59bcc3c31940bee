"""Dynamic batching: requests wait in a bounded queue; one worker per device takes up to
``max_batch_size`` of them within ``max_wait_s`` and runs them through the model together."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import ClientGone, Draining, QueueFull, ServiceError, TimedOut
from service.metrics import Metrics

__all__ = ["Batcher", "Completed", "QueueGroup"]

log = logging.getLogger(__name__)

_EXPIRED = "the request waited past its deadline in the queue"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Completed(Generic[R]):
    result: R
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    deadline: float
    future: asyncio.Future[Completed[R]]
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False  # taken by the worker; from then on it will be answered


class _Throughput:
    """Images per second over the last few batches, for ``Retry-After``."""

    def __init__(self, window: int = 32) -> None:
        self._batches: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def add(self, n: int, seconds: float) -> None:
        self._batches.append((n, seconds))

    def per_second(self) -> float | None:
        busy = sum(s for _, s in self._batches)
        return sum(n for n, _ in self._batches) / busy if busy > 0 else None


class QueueGroup:
    """The queue limit that several batchers (one per model) share: a request waits for a
    model's batch only while fewer than ``max_queue`` wait for all of them together, because
    they all wait for the same device."""

    def __init__(
        self,
        max_queue: int,
        metrics: Metrics,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        self.max_queue = max_queue
        self._metrics = metrics
        self._on_depth = on_depth  # told every change: the inference worker tells the fronts
        self._members: list[Batcher[Any, Any]] = []

    def join(self, batcher: Batcher[Any, Any]) -> None:
        self._members.append(batcher)

    @property
    def depth(self) -> int:
        return sum(b.depth for b in self._members)

    def report(self) -> None:
        depth = self.depth
        self._metrics.queue_depth.labels(stage="batch").set(depth)
        if self._on_depth is not None:
            self._on_depth(depth)


class Batcher(Generic[T, R]):
    """Collects items into batches for ``fn`` (blocking, run on a dedicated thread: its own, or
    ``executor``, a one-thread pool that its owner shuts down).

    ``fn`` must return one result per item, in order. If it raises, every item of that batch
    gets the error; a :class:`ServiceError` keeps its status, anything else becomes a 500.
    ``group``: the queue limit shared with other batchers (default: one of its own);
    ``model``: the label of its metrics.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
        executor: ThreadPoolExecutor | None = None,
        group: QueueGroup | None = None,
        model: str = "default",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if not 0 <= max_wait_s <= 10:
            raise ValueError(f"max_wait_s must be between 0 and 10 seconds, not {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._group = group or QueueGroup(max_queue, metrics)
        self._group.join(self)
        self.max_queue = self._group.max_queue
        self.model = model
        self._metrics = metrics
        # This queue's children of the labelled metrics, looked up once rather than per item.
        self._queue_wait = metrics.queue_wait.labels(model=model)
        self._batch_size = metrics.batch_size.labels(model=model)
        self._inference_duration = metrics.inference_duration.labels(model=model)
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._throughput = _Throughput()
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="u2serve-infer")
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="u2serve-batcher")

    async def stop(self) -> None:
        """Answer everything still queued, then stop the worker."""
        self._closed = True
        while self._queue or self._busy:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    def retry_after(self) -> int:
        """Seconds until the queue has room again at the recent throughput (at least 1)."""
        rate = self._throughput.per_second()
        if not rate:
            return 1
        return max(1, math.ceil((self._group.depth + self.max_batch_size) / rate))

    def check_capacity(self) -> None:
        """Raise 503 now if a new item would not fit, before the caller spends work on it."""
        if self._closed:
            raise Draining("the service is shutting down", headers={"Retry-After": "1"})
        if self._group.depth >= self.max_queue:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise QueueFull(
                f"the queue is full ({self.max_queue} waiting); retry later",
                headers={"Retry-After": str(self.retry_after())},
            )

    # -- requests ----------------------------------------------------------------------------
    async def submit(
        self, item: T, deadline: float, *, cancelled: asyncio.Future[object] | None = None
    ) -> Completed[R]:
        """Queue ``item`` and wait for its result until ``deadline`` (``time.monotonic()``).

        An item still queued when its deadline passes, or when ``cancelled`` completes (the
        client went away), is withdrawn and never reaches the model.
        """
        self.check_capacity()
        pending: _Pending[T, R] = _Pending(
            item, deadline, asyncio.get_running_loop().create_future()
        )
        self._queue.append(pending)
        self._group.report()
        self._wakeup.set()
        waiters: set[asyncio.Future[object]] = {pending.future}  # type: ignore[arg-type]
        if cancelled is not None:
            waiters.add(cancelled)
        try:
            while True:
                timeout = deadline - time.monotonic()
                done, _ = await asyncio.wait(
                    waiters, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
                )
                if pending.future in done:
                    return pending.future.result()
                if pending.started:
                    # Already in a batch: it will be answered shortly; wait for it.
                    waiters.discard(cancelled)
                    deadline = math.inf
                    continue
                self._withdraw(pending)
                if cancelled is not None and cancelled in done:
                    self._metrics.rejected.labels(reason="client_disconnected").inc()
                    raise ClientGone("the client disconnected while its request was queued")
                self._metrics.rejected.labels(reason="deadline").inc()
                raise TimedOut(_EXPIRED)
        finally:
            if not pending.future.done():
                pending.future.cancel()

    def _withdraw(self, pending: _Pending[T, R]) -> None:
        with contextlib.suppress(ValueError):  # the worker took it meanwhile
            self._queue.remove(pending)
        self._group.report()

    # -- the worker --------------------------------------------------------------------------
    async def _collect(self) -> list[_Pending[T, R]]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch_deadline = time.monotonic() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closed:
            remaining = batch_deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_Pending[T, R]] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if p.future.done():
                continue
            if p.deadline <= now:
                self._metrics.rejected.labels(reason="deadline").inc()
                p.future.set_exception(TimedOut(_EXPIRED))
                continue
            p.started = True
            batch.append(p)
        self._group.report()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self._busy = True
            start = time.monotonic()
            for p in batch:
                self._queue_wait.observe(start - p.enqueued)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._fn, [p.item for p in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:
                if not isinstance(exc, ServiceError):
                    log.exception("inference failed for a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
            else:
                elapsed = time.monotonic() - start
                for p, r in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(Completed(r, start - p.enqueued, elapsed, len(batch)))
            finally:
                elapsed = time.monotonic() - start
                self._busy = False
                self._throughput.add(len(batch), elapsed)
                self._batch_size.observe(len(batch))
                self._inference_duration.observe(elapsed)
