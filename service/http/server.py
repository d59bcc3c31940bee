"""The HTTP server: uvicorn, with the service's connection guard, draining gracefully on
SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.http.runtime import Runtime

__all__ = ["serve_app"]

log = logging.getLogger("u2serve")


class _DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (readiness 503, new work 503, accepted work answered),
    then exits; a second one exits at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self.should_exit:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self.runtime.drain(self.runtime.settings.drain_timeout_s)
        self.should_exit = True


def serve_app(
    app: FastAPI, settings: Settings, *, sockets: list[socket.socket] | None = None
) -> int:
    """Serve ``app`` under uvicorn (on ``sockets`` if given, else on the settings' address)
    until it has drained; the exit status."""
    from service.http.connections import GuardedHttpProtocol

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        log_config=None,
        # The service writes its own access line per /segment request (service/core/access.py);
        # uvicorn's would add one per health probe, without request id or timings.
        access_log=False,
        http=type(
            "HttpProtocol", (GuardedHttpProtocol,), {"header_timeout_s": settings.header_timeout_s}
        ),
        limit_concurrency=settings.max_connections,
    )
    server = _DrainingServer(config, app.state.runtime)
    server.run(sockets=sockets)
    # uvicorn returns normally after a failed start-up; make that a failing exit status.
    return 0 if server.started else 1
