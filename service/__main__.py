"""``python -m service``: run the service under uvicorn, draining gracefully on SIGTERM; with
``U2SERVE_WORKERS`` > 1, as front processes in front of an inference worker
(:mod:`service.supervisor`).

Nothing that imports prometheus-client is imported here at the top: with several processes the
supervisor first tells it where the processes' metrics go."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from pydantic import ValidationError

from service.access import JsonFormatter
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.app import Runtime

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
    from service.connections import GuardedHttpProtocol

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        log_config=None,
        # The service writes its own access line per /segment request (service/access.py);
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="default: $U2SERVE_HOST or 0.0.0.0")
    parser.add_argument("--port", type=int, help="default: $U2SERVE_PORT or 8000")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            name = "U2SERVE_" + "_".join(str(x) for x in err["loc"]).upper()
            print(
                f"invalid setting {name}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr
            )
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    for name in Settings.unknown_variables(os.environ):
        log.warning("%s is not a setting and is ignored (the README lists them all)", name)
    from service.budget import limit_arenas

    # One malloc arena a core, set before any engine or codec thread allocates.
    limit_arenas(len(os.sched_getaffinity(0)))
    if settings.workers > 1:
        from service.supervisor import run

        return run(settings)
    from service.app import create_app

    return serve_app(create_app(settings, owns_process=True), settings)


if __name__ == "__main__":
    sys.exit(main())
