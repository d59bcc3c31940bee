"""The batcher on its own, with a plain blocking batch function."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.core.batcher import Batcher, QueueGroup
from service.errors import ClientGone, InvalidParameter, QueueFull, TimedOut
from service.metrics import Metrics


class Recorder:
    """Doubles its inputs; can be held closed to keep the worker busy."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(10)
        self.batches.append(list(items))
        return [2 * i for i in items]


def make(fn: Recorder, **kw: float) -> Batcher[int, int]:
    opts = {"max_batch_size": 4, "max_wait_s": 0.05, "max_queue": 8, **kw}
    return Batcher(fn, metrics=Metrics(), **opts)  # type: ignore[arg-type]


def far() -> float:
    return time.monotonic() + 10


async def held(fn: Recorder, **kw: float) -> tuple[Batcher[int, int], asyncio.Future[object]]:
    """A batcher of batch size 1 whose worker is busy with item 1 until ``fn.gate`` opens."""
    fn.gate.clear()
    b = make(fn, max_batch_size=1, max_wait_s=0, **kw)
    b.start()
    first: asyncio.Future[object] = asyncio.ensure_future(b.submit(1, far()))
    await asyncio.sleep(0.05)
    return b, first


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_wait_s": -1}, "max_wait_s"),
        ({"max_queue": 0}, "max_queue"),
    ],
)
def test_constructor_validates(kw: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(Recorder(), **kw)


async def test_concurrent_items_share_batches_in_order() -> None:
    fn = Recorder()
    b = make(fn, max_queue=16)
    b.start()
    results = await asyncio.gather(*(b.submit(i, far()) for i in range(10)))
    await b.stop()
    assert [r.result for r in results] == [2 * i for i in range(10)]
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert max(r.batch_size for r in results) == 4


async def test_full_queue_is_refused_with_retry_after() -> None:
    fn = Recorder()
    b, first = await held(fn, max_queue=2)
    queued = [asyncio.ensure_future(b.submit(i, far())) for i in (2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as exc:
        await b.submit(4, far())
    assert int(exc.value.headers["Retry-After"]) >= 1
    fn.gate.set()
    assert [r.result for r in await asyncio.gather(first, *queued)] == [2, 4, 6]
    await b.stop()


async def test_batchers_of_a_group_share_one_queue_limit() -> None:
    """One model's waiting requests count against another's: both wait for the same device."""
    metrics = Metrics()
    group = QueueGroup(2, metrics)
    a_fn, b_fn = Recorder(), Recorder()
    a_fn.gate.clear()
    b_fn.gate.clear()
    opts = {"max_batch_size": 1, "max_wait_s": 0, "max_queue": 2, "metrics": metrics}
    a = Batcher(a_fn, group=group, model="a", **opts)  # type: ignore[arg-type]
    b = Batcher(b_fn, group=group, model="b", **opts)  # type: ignore[arg-type]
    a.start()
    b.start()
    busy = asyncio.ensure_future(a.submit(1, far()))  # taken by a's worker, not waiting
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(x.submit(i, far())) for x, i in ((a, 2), (b, 3))]
    await asyncio.sleep(0.05)  # b's worker took 3: one waits in a's queue
    waiting.append(asyncio.ensure_future(b.submit(4, far())))
    await asyncio.sleep(0)
    assert group.depth == 2
    with pytest.raises(QueueFull):
        await a.submit(5, far())
    with pytest.raises(QueueFull):
        await b.submit(6, far())
    a_fn.gate.set()
    b_fn.gate.set()
    assert [r.result for r in await asyncio.gather(busy, *waiting)] == [2, 4, 6, 8]
    assert a_fn.batches == [[1], [2]]
    assert b_fn.batches == [[3], [4]]
    await a.stop()
    await b.stop()


def test_retry_after_follows_recent_throughput() -> None:
    b = make(Recorder(), max_batch_size=4)
    assert b.retry_after() == 1  # nothing measured yet
    b._throughput.add(4, 2.0)  # 2 images/s
    assert b.retry_after() == 2  # room for a batch of 4 in 2 s
    b._throughput.add(4, 18.0)  # 8 images in 20 s: 0.4 images/s
    assert b.retry_after() == 10


async def test_expired_items_never_reach_the_model() -> None:
    fn = Recorder()
    b, first = await held(fn)
    with pytest.raises(TimedOut):
        await b.submit(2, time.monotonic() + 0.1)
    fn.gate.set()
    await first
    await b.stop()
    assert fn.batches == [[1]]


async def test_disconnected_client_is_dropped_from_the_queue() -> None:
    fn = Recorder()
    b, first = await held(fn)
    gone: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    second = asyncio.ensure_future(b.submit(2, far(), cancelled=gone))
    await asyncio.sleep(0.01)
    assert b.depth == 1
    gone.set_result(None)
    with pytest.raises(ClientGone):
        await second
    assert b.depth == 0
    fn.gate.set()
    await first
    await b.stop()
    assert fn.batches == [[1]]


async def test_errors_reach_every_item_of_the_batch() -> None:
    def broken(items: list[int]) -> list[int]:
        raise InvalidParameter("bad batch")

    b: Batcher[int, int] = Batcher(
        broken, max_batch_size=4, max_wait_s=0.05, max_queue=8, metrics=Metrics()
    )
    b.start()
    outcomes = await asyncio.gather(*(b.submit(i, far()) for i in range(3)), return_exceptions=True)
    await b.stop()
    assert all(isinstance(o, InvalidParameter) for o in outcomes)


async def test_wrong_number_of_results_is_an_error() -> None:
    b: Batcher[int, int] = Batcher(
        lambda items: items[:1], max_batch_size=4, max_wait_s=0.05, max_queue=8, metrics=Metrics()
    )
    b.start()
    outcomes = await asyncio.gather(*(b.submit(i, far()) for i in range(2)), return_exceptions=True)
    await b.stop()
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_stop_answers_everything_queued() -> None:
    fn = Recorder()
    b = make(fn, max_batch_size=2)
    b.start()
    pending = [asyncio.ensure_future(b.submit(i, far())) for i in range(5)]
    await asyncio.sleep(0)
    await b.stop()
    assert [p.result().result for p in pending] == [0, 2, 4, 6, 8]
