"""Admission by count: how many requests the service holds at once, from the moment one is
admitted (before its body is read) until its answer is written.

A request waits in more places than the batcher's queue: for the codec pool to decode it, for
the network, for the codec pool again to resize its map back and encode the answer, and, with
front processes, at the inference worker. A bound on one of those queues lets work pile up in
the others out of its sight (with a fast network, in the codec pool, until deadlines pass), so
the bound is on all of them together:

    limit = U2SERVE_MAX_QUEUE + the requests the service can work on at once
          = max_queue + max_batch_size + codec_threads × front processes

that is, ``max_queue`` requests may wait, in any stage, beyond one batch at the network and one
image on each codec thread. Past the limit a request is answered 503 with ``Retry-After`` at
once, before its body is read. ``Retry-After`` is the time the service took lately to answer
as many requests as it holds: the drain rate of the whole path, not of the network alone.

With front processes (``U2SERVE_WORKERS`` > 1) the count and the answers lie in memory the
supervisor shares with every front, so one bound holds across them.

Inside the bound, each request still keeps its deadline in every stage: :class:`PoolStage` withdraws
work still waiting for a codec thread when its deadline passes or its client goes away, so
nothing is decoded or encoded for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from service.errors import ClientGone, QueueFull, ServiceError, TimedOut
from service.settings import Settings

if TYPE_CHECKING:  # not imported before the supervisor has told prometheus-client its folder
    from service.metrics import Metrics

__all__ = ["STAGES", "Admission", "Counts", "PoolStage", "in_flight_limit"]

P = ParamSpec("P")
R = TypeVar("R")

# The stages a request waits in, each a series of u2serve_queue_depth: the codec pool before
# its photo is decoded, the model's batch, the codec pool before its answer is made.
STAGES = ("decode", "batch", "encode")


def in_flight_limit(settings: Settings, max_batch_size: int) -> int:
    """Requests the whole service may hold, every front's together: ``max_queue`` waiting
    beyond what it works on at once (one batch, one image on each codec thread)."""
    return settings.max_queue + max_batch_size + settings.codec_threads * settings.workers


@dataclass(frozen=True)
class Counts:
    """What admission keeps: the requests each front holds now (``held[front]`` is this
    process's; one per front, so that a front that dies can be forgotten) and the requests
    answered so far; in memory shared by every front where there are several."""

    held: Any  # multiprocessing.Array("i", fronts)
    answered: Any  # multiprocessing.Value("q")
    front: int = 0

    @classmethod
    def local(cls) -> Counts:
        """Counts for a service of one process: plain numbers, kept on its event loop."""
        return cls(_Numbers([0]), _Number())


class _Lockless:
    """A ``multiprocessing`` value's lock, for one thread: none."""

    def get_lock(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class _Number(_Lockless):
    def __init__(self) -> None:
        self.value = 0


class _Numbers(list[int], _Lockless):
    pass


class _DrainRate:
    """Answers per second over the last answers seen by this process (the answered count is the
    whole service's), for ``Retry-After``."""

    def __init__(self, window: int = 64, horizon_s: float = 30.0) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)
        self._horizon_s = horizon_s

    def add(self, now: float, answered: int) -> None:
        self._samples.append((now, answered))

    def per_second(self, now: float) -> float | None:
        while self._samples and now - self._samples[0][0] > self._horizon_s:
            self._samples.popleft()
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None


class Admission:
    """The bound on requests held at once (see the module's docstring).

    ``admit()`` counts a request in, or raises :class:`QueueFull`; ``release()`` counts it out
    once its answer is written (or it failed). ``counts``: the shared counts of several fronts;
    one process's own by default.
    """

    def __init__(self, limit: int, metrics: Metrics, counts: Counts | None = None) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, not {limit}")
        self.limit = limit
        self._counts = counts or Counts.local()
        self._metrics = metrics
        self._rate = _DrainRate()
        self._full = metrics.rejected.labels(reason="queue_full")
        metrics.in_flight_limit.set(limit)

    @property
    def held(self) -> int:
        """The requests every front holds now."""
        return sum(self._counts.held[:])

    def admit(self) -> None:
        """Count a request in; 503 with ``Retry-After`` if the service holds its limit."""
        held, front = self._counts.held, self._counts.front
        with held.get_lock():
            holding = sum(held[:])
            if holding < self.limit:
                held[front] += 1
                return
        self._full.inc()
        raise QueueFull(
            f"the service holds as many requests as it may ({self.limit}); retry later",
            headers={"Retry-After": str(self.retry_after(holding))},
        )

    def release(self) -> None:
        """Count a request out: its answer is written, or it failed."""
        held = self._counts.held
        with held.get_lock():
            held[self._counts.front] -= 1
        answered = self._counts.answered
        with answered.get_lock():
            answered.value += 1
            total = answered.value
        self._rate.add(time.monotonic(), total)

    def retry_after(self, holding: int | None = None) -> int:
        """Seconds the whole path took lately to answer as many requests as it holds (at least
        1; 1 before anything was answered)."""
        rate = self._rate.per_second(time.monotonic())
        if not rate:
            return 1
        holding = self.held if holding is None else holding
        return max(1, math.ceil(holding / rate))


class PoolStage:
    """A stage of a request's path that runs on a thread pool, under the request's deadline.

    :meth:`run` withdraws work still waiting for a thread when its deadline passes (504) or its
    client goes away (499), so nothing is decoded or encoded for nobody; meanwhile it counts in
    ``u2serve_queue_depth{stage=name}``.
    """

    def __init__(self, pool: ThreadPoolExecutor, name: str, metrics: Metrics) -> None:
        self.pool, self.name = pool, name
        self._waiting = metrics.queue_depth.labels(stage=name)
        self._expired = metrics.rejected.labels(reason="deadline")
        self._gone = metrics.rejected.labels(reason="client_disconnected")

    async def run(
        self,
        deadline: float,
        cancelled: asyncio.Future[Any] | None,
        fn: Callable[P, R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """``fn(*args)`` on a thread of the pool, unless ``deadline`` (``time.monotonic()``)
        has passed, or passes or ``cancelled`` completes while it waits for one."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:  # past it already (held at the network meanwhile): no answer is due
            self._expired.inc()
            raise TimedOut(f"the request was past its deadline before it could {self.name}")
        waiting = self._waiting

        def run() -> R:
            waiting.dec()
            return fn(*args, **kwargs)

        waiting.inc()
        job: Future[R] = self.pool.submit(run)
        withdrawn: list[ServiceError] = []

        def withdraw(why: Callable[[], ServiceError]) -> None:
            if job.cancel():  # not started: it never will be, and its future is cancelled
                waiting.dec()
                withdrawn.append(why())

        def client_gone(_: object) -> None:
            withdraw(self._client_gone)

        # A timer and a callback rather than asyncio.wait: the stage runs twice a request, on
        # the event loop, and this is the cheaper way to watch the two.
        timer = asyncio.get_running_loop().call_later(timeout, withdraw, self._expired_waiting)
        if cancelled is not None:
            cancelled.add_done_callback(client_gone)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if withdrawn:  # this stage cancelled it, not the request's task being cancelled
                raise withdrawn[0] from None
            raise
        finally:
            timer.cancel()
            if cancelled is not None:
                cancelled.remove_done_callback(client_gone)

    def _expired_waiting(self) -> TimedOut:
        self._expired.inc()
        return TimedOut(f"the request waited past its deadline for a thread to {self.name} it")

    def _client_gone(self) -> ClientGone:
        self._gone.inc()
        return ClientGone(f"the client disconnected while its request waited to {self.name}")
