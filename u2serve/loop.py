"""An event loop in a thread of its own: the synchronous faces (:class:`~u2serve.Client`,
:class:`~u2serve.Remover`) run their asynchronous work there and wait for it, from as many
threads as call them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """A running event loop in a daemon thread (it never holds up the interpreter's exit)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result. If the wait is interrupted
        (Ctrl-C), ``coro`` is cancelled and its cancellation waited for, so that nothing it
        began goes on, and the next call finds what it used at rest."""
        answer: Future[T] = Future()
        finished = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def settle(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                answer.cancel()
            elif (exc := task.exception()) is not None:
                answer.set_exception(exc)
            else:
                answer.set_result(task.result())
            finished.set()

        def begin() -> None:
            task = self._loop.create_task(coro)
            task.add_done_callback(settle)
            tasks.append(task)

        self._loop.call_soon_threadsafe(begin)
        try:
            return answer.result()
        except BaseException:
            # Scheduled after begin, so the task exists by then.
            self._loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            finished.wait()
            raise

    def stop(self) -> None:
        """Stop the loop and its thread; what is still scheduled there is dropped."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
