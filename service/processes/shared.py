"""What the processes of one service share (``U2SERVE_WORKERS`` > 1), made by the supervisor
before it starts them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.admission import in_flight_limit
from service.settings import Settings

__all__ = ["Shared", "front_slots"]


@dataclass(frozen=True)
class Shared:
    """What the supervisor makes before it starts the processes, and they share: the memory
    budget's bytes held, the worker's queue depth and ``Retry-After``, whether the worker is
    ready, the requests every front holds and has answered (:mod:`service.core.admission`), and the
    folder of the worker's socket and the fronts' slot files."""

    held: Any  # multiprocessing.Array("q", fronts): the memory budget's bytes each front holds
    depth: Any  # multiprocessing.Value("i")
    retry_after: Any  # multiprocessing.Value("i")
    worker_ready: Any  # multiprocessing.Value("b")
    requests: Any  # multiprocessing.Array("i", fronts): the requests each front holds
    answered: Any  # multiprocessing.Value("q")
    directory: Path
    front: int = 0  # in a front process, its own index among the fronts

    def forget_front(self, front: int) -> None:
        """What a dead front held is held no more: its requests and their memory died with it."""
        with self.requests.get_lock():
            self.requests[front] = 0
        with self.held.get_lock():
            self.held[front] = 0

    @property
    def socket(self) -> Path:
        return self.directory / "worker.sock"

    def slots_file(self, pid: int) -> Path:
        return self.directory / f"front-{pid}.slots"


def front_slots(settings: Settings) -> int:
    """How many of a front's requests may be at the worker at once, each with a slot: as many
    as the whole service may hold (the largest default batch where none is set)."""
    return in_flight_limit(settings, settings.max_batch_size or 32)
