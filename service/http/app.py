"""The HTTP face's app factory: ``create_app(settings)``. Nothing heavy happens at import; the
lifespan starts the core (:func:`service.core.service.start_service`, or in a front process
:func:`service.processes.remote.start_front`), which loads and verifies the weights, starts the
batchers and warms up, and on exit drains and stops."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.core.pipeline import Served
from service.core.service import load_segmenter, start_service, url_fetcher
from service.errors import ServiceError
from service.http.errors import error_response, response_of
from service.http.runtime import Runtime, RuntimeDep
from service.images.encode import BOX_HEADERS
from service.processes.remote import start_front
from service.processes.shared import Shared
from service.settings import Settings

__all__ = ["App", "Runtime", "RuntimeDep", "Served", "create_app", "load_segmenter", "url_fetcher"]

log = logging.getLogger("u2serve")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    rt: Runtime = app.state.runtime
    if rt.shared is not None:
        starting = start_front(
            rt.settings,
            rt.metrics,
            rt.shared,
            owns_process=rt.owns_process,
            fetcher=rt.initial_fetcher,
        )
    else:
        starting = start_service(
            rt.settings, rt.metrics, owns_process=rt.owns_process, fetcher=rt.initial_fetcher
        )
    async with starting as service:
        rt.service = service
        yield


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> Response:
        return response_of(exc)

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
    several (:mod:`service.processes.supervisor`), whose models run in the inference worker.
    """
    from service.http.compat import TAGS
    from service.http.pages import install_pages
    from service.http.routes import DIRECT, operations, router
    from service.http.schema import Offer, document

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
        settings, owns_process=owns_process, shared=shared, initial_fetcher=url_fetcher(settings)
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
                # remove.bg's (service/http/compat/removebg.py)
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
        """FastAPI's document, and the image routes' as these settings serve them (the loaded
        models, URL input)."""
        if app.openapi_schema is None:
            offer = Offer(settings.served_models, settings.url_input)
            app.openapi_schema = document(generated(), router.routes, operations(offer))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
