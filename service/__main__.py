"""``python -m service``: run the service under uvicorn, draining gracefully on SIGTERM; with
``U2SERVE_WORKERS`` > 1, as front processes in front of an inference worker
(:mod:`service.processes.supervisor`).

Nothing that imports prometheus-client is imported here at the top: with several processes the
supervisor first tells it where the processes' metrics go."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from service.core.access import JsonFormatter
from service.settings import Settings

log = logging.getLogger("u2serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="default: $U2SERVE_HOST or 0.0.0.0")
    parser.add_argument("--port", type=int, help="default: $U2SERVE_PORT or 8000")
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="first fetch, verify and convert the released weights of the served models "
        "(python -m weights fetch, in this process), unless U2SERVE_WEIGHTS names a file",
    )
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
    if args.fetch and not fetch_served(settings):
        return 1
    from service.core.budget import limit_arenas

    # One malloc arena a core, set before any engine or codec thread allocates.
    limit_arenas(len(os.sched_getaffinity(0)))
    if settings.workers > 1:
        from service.processes.supervisor import run

        return run(settings)
    from service.http.app import create_app
    from service.http.server import serve_app

    return serve_app(create_app(settings, owns_process=True), settings)


def fetch_served(settings: Settings) -> bool:
    """``python -m weights fetch`` for each served model, in this process (``make serve``: one
    interpreter start, not two); False, having said why, where one fails."""
    if settings.weights is not None:
        log.info("U2SERVE_WEIGHTS names %s: nothing to fetch", settings.weights)
        return True
    from model.weights import WeightsError
    from weights.fetch import fetch

    try:
        for name in settings.served_models:
            fetch(name, settings.weights_dir)
    except (WeightsError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
