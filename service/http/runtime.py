"""What the HTTP face's routes hold: the app's :class:`Runtime`, given to each endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.core.budget import MemoryBudget
from service.core.infer import Model
from service.core.pipeline import Pipeline, Queue, Served
from service.core.service import Service
from service.errors import NotReady
from service.metrics import Metrics
from service.processes.shared import Shared
from service.settings import Settings
from service.url.fetch import UrlFetcher

__all__ = ["Runtime", "RuntimeDep", "get_runtime"]


@dataclass(eq=False)
class Runtime:
    """What the routes hold, owned by one app: the settings and metrics from the start, and the
    core (``service``) once the lifespan has started it; the one thing that may be missing."""

    settings: Settings
    owns_process: bool = False
    # A front process's memory shared with the supervisor and the inference worker
    # (U2SERVE_WORKERS > 1); None where this process runs the models itself.
    shared: Shared | None = None
    metrics: Metrics = field(default_factory=Metrics)
    service: Service | None = None
    # The URL fetcher the core starts with (None where URL input is off).
    initial_fetcher: UrlFetcher | None = None

    @property
    def fetcher(self) -> UrlFetcher | None:
        """The URL fetcher the core uses (None where URL input is off)."""
        return self.service.fetcher if self.service else self.initial_fetcher

    @fetcher.setter
    def fetcher(self, fetcher: UrlFetcher | None) -> None:
        self.initial_fetcher = fetcher
        if self.service is not None:
            self.service.fetcher = fetcher

    @property
    def pipeline(self) -> Pipeline | None:
        return self.service.pipeline if self.service else None

    @property
    def is_ready(self) -> bool:
        """Whether the core takes work: loaded and warmed up, not draining."""
        return self.service is not None and self.service.is_ready

    @property
    def draining(self) -> bool:
        return self.service is not None and self.service.draining

    @property
    def worker_ready(self) -> bool:
        """Whether the models' process is serving: this one, or the inference worker."""
        return self.shared is None or bool(self.shared.worker_ready.value)

    @property
    def models(self) -> dict[str, Served]:
        """The loaded models, the default one first (none before loading)."""
        return self.service.models if self.service else {}

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
        return self.service.parts.budget if self.service else None

    def serving(self) -> Service:
        """The core, while it takes work; 503 while loading, warming up or draining."""
        if self.service is None:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the model is still loading", headers={"Retry-After": "1"})
        self.service.serving()
        return self.service

    async def drain(self, limit_s: float) -> bool:
        """Refuse new work, then wait for accepted work to be answered. True if all was."""
        return True if self.service is None else await self.service.drain(limit_s)


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain function dependency in a thread pool, a handoff per request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
