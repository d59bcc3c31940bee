"""Several processes for one service (``U2SERVE_WORKERS`` > 1), in LitServe's shape: front
processes that speak HTTP on one listening socket, in front of one inference worker per device.

The per-request Python (HTTP, the upload, decoding and encoding, the map resized back) runs in
every front, on every core; the worker batches every front's requests onto the device
(:mod:`service.processes.worker`, :mod:`service.processes.remote`). This process only starts them,
before anything in
it has started a thread, and keeps them running:

- a front that dies is started again (the connections it held are reset, so their clients get
  an error at once, never a hang); a worker that dies is started again, and the fronts answer
  what was waiting on it with 503 and ``Retry-After``;
- SIGTERM (or SIGINT) drains: every front stops taking work and answers what it accepted, then
  the worker stops; a second one stops everything at once.

What must hold across the processes lives in memory they share: the memory budget's bytes, the
queue's depth and ``Retry-After``, the worker's readiness. Metrics are added up across them
(prometheus-client's multiprocess mode, in a folder made here).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType

from model.weights import SPECS
from service.processes.shared import Shared, front_slots
from service.settings import Settings

__all__ = ["run"]

log = logging.getLogger("u2serve")

# A child that dies sooner than this after its start is started again only after this long, so a
# process that cannot start (a broken model file) does not spin.
_RESTART_BACKOFF_S = 1.0


def _folder(settings: Settings) -> Path:
    """A private folder for the worker's socket, the fronts' slot files and the metrics: in
    shared memory where it has room for every slot twice over (a container's /dev/shm is often
    64 MiB), else in the temporary folder (the files are then written back to disk now and
    then, but the kernel's page cache serves both processes the same)."""
    side = max(SPECS[m].input_size for m in settings.served_models)
    need = settings.workers * front_slots(settings) * (3 * side * side * 4 + side * side)
    base: Path | None = None
    shm = Path("/dev/shm")
    if shm.is_dir():
        stat = os.statvfs(shm)
        if stat.f_bavail * stat.f_frsize >= 2 * need:
            base = shm
    return Path(tempfile.mkdtemp(prefix="u2serve-", dir=base))


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _fork(target: Callable[[], int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = target()
    except BaseException:
        logging.getLogger("u2serve").exception("a service process failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _worker(settings: Settings, shared: Shared) -> int:
    from service.processes.worker import serve

    asyncio.run(serve(settings, shared))
    return 0


def _front(settings: Settings, shared: Shared, sock: socket.socket) -> int:
    from service.http.app import create_app
    from service.http.server import serve_app

    app = create_app(settings, owns_process=True, shared=shared)
    return serve_app(app, settings, sockets=[sock])


def run(settings: Settings) -> int:
    """Run the service as ``settings.workers`` fronts and one inference worker until SIGTERM."""
    directory = _folder(settings)
    metrics_dir = directory / "metrics"
    metrics_dir.mkdir()
    # Before any process imports prometheus-client: its values then go to files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    shared = Shared(
        multiprocessing.Array("q", settings.workers),
        multiprocessing.Value("i", 0),
        multiprocessing.Value("i", 1),
        multiprocessing.Value("b", 0),
        multiprocessing.Array("i", settings.workers),
        multiprocessing.Value("q", 0),
        directory,
    )
    sock = _listen(settings.host, settings.port)
    roles: dict[int, str] = {}
    started: dict[str, float] = {}
    state = {"stopping": False, "worker_stopped": False}

    def start(role: str) -> None:
        if time.monotonic() - started.get(role, 0.0) < _RESTART_BACKOFF_S:
            time.sleep(_RESTART_BACKOFF_S)
        started[role] = time.monotonic()
        if role == "worker":
            pid = _fork(lambda: _worker(settings, shared))
        else:
            own = replace(shared, front=int(role.removeprefix("front-")))
            pid = _fork(lambda: _front(settings, own, sock))
        roles[pid] = role

    def stop(sig: int, frame: FrameType | None) -> None:
        if state["stopping"]:  # a second signal: at once
            for pid in roles:
                os.kill(pid, signal.SIGKILL)
            return
        state["stopping"] = True
        log.info(
            "received %s: draining %d front processes", signal.Signals(sig).name, len(roles) - 1
        )
        for pid, role in roles.items():
            if role.startswith("front"):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    start("worker")
    for i in range(settings.workers):
        start(f"front-{i}")
    log.info(
        "serving on %s:%d with %d front processes", settings.host, settings.port, settings.workers
    )
    status = 0
    while roles:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        role = roles.pop(pid, None)
        if role is None:
            continue
        _forget(pid, shared)
        if role.startswith("front-"):
            shared.forget_front(int(role.removeprefix("front-")))
        if role == "worker":
            was_ready = shared.worker_ready.value == 1
            shared.worker_ready.value = 0
            if not was_ready and not state["stopping"]:
                # It never got as far as serving (missing weights, no GPU): as the single
                # process does, the service stops, with the worker's message in the log.
                log.error("the inference worker could not start; stopping")
                stop(signal.SIGTERM, None)
                status = 1
                continue
        if not state["stopping"]:
            log.error("%s (pid %d) exited with %s; starting another", role, pid, code)
            start(role)
        elif not any(r.startswith("front") for r in roles.values()) and not state["worker_stopped"]:
            state["worker_stopped"] = True
            for other, r in roles.items():
                if r == "worker":
                    os.kill(other, signal.SIGTERM)
        if code != 0 and state["stopping"]:
            status = 1
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)
    return status


def _forget(pid: int, shared: Shared) -> None:
    """What a dead process leaves: its slot file, and its live gauges' series."""
    from prometheus_client import multiprocess

    shared.slots_file(pid).unlink(missing_ok=True)
    multiprocess.mark_process_dead(pid)
