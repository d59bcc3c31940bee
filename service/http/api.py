"""What one HTTP API of the service is, to the route that serves it: ``POST /segment`` (the
service's own), and the APIs other tools already speak (:mod:`service.http.compat`).

An API reads a request into a :class:`Call` (its own field names and rules, translated into the
service's :class:`~service.core.request.Submission`), the call is answered through the one
:class:`~service.core.pipeline.Pipeline`, and an error is written in the API's own shape. The route
(``service/http/routes.py``'s ``serve``) does the rest for every API alike: the API key, admission,
the memory charged for the body, the access log and the metrics, labelled by :attr:`Api.name`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from starlette.requests import Request
from starlette.responses import Response

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.core.pipeline import Pipeline, RequestContext
    from service.settings import Settings

__all__ = ["Api", "Call", "Reading"]


@dataclass(frozen=True)
class Reading:
    """What reading a request may take: ``max_bytes`` of image, within ``timeout_s``; the
    models a request may name; whether a URL is accepted; and the pool that parses a large
    body off the event loop."""

    max_bytes: int
    timeout_s: float
    models: Sequence[str]
    url_input: bool
    pool: Executor


class Call(Protocol):
    """A request, read: answers itself through the pipeline, in its API's shape."""

    async def answer(self, pipeline: Pipeline, ctx: RequestContext) -> Response: ...


class Api(Protocol):
    """One HTTP API of the service."""

    @property
    def name(self) -> str:
        """The ``api`` label of its metrics and access lines: ``segment``, ``removebg``,
        ``rembg``."""
        ...

    def body_limit(self, settings: Settings) -> int:
        """The most bytes a request's body may hold (charged before it is read)."""
        ...

    async def read(self, request: Request, reading: Reading) -> Call:
        """The request read and validated; a :class:`ServiceError` otherwise."""
        ...

    def error(self, exc: ServiceError) -> Response:
        """An error, written as this API's clients expect it."""
        ...
