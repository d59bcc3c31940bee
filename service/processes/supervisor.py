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
    shared = _share(settings, directory)
    sock = _listen(settings.host, settings.port)
    status = _Supervisor(settings, shared, sock).run()
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)
    return status


def _share(settings: Settings, directory: Path) -> Shared:
    """What the processes will share, in ``directory``, the metrics' files included."""
    metrics_dir = directory / "metrics"
    metrics_dir.mkdir()
    # Before any process imports prometheus-client: its values then go to files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return Shared(
        multiprocessing.Array("q", settings.workers),
        multiprocessing.Value("i", 0),
        multiprocessing.Value("i", 1),
        multiprocessing.Value("b", 0),
        multiprocessing.Array("i", settings.workers),
        multiprocessing.Value("q", 0),
        directory,
    )


class _Supervisor:
    """The service's processes by pid, each with its role (``worker``, ``front-N``): started,
    started again when one dies, and stopped in order on SIGTERM."""

    def __init__(self, settings: Settings, shared: Shared, sock: socket.socket) -> None:
        self.settings, self.shared, self.sock = settings, shared, sock
        self.roles: dict[int, str] = {}
        self.started: dict[str, float] = {}
        self.stopping = False
        self.worker_stopped = False
        self.status = 0

    def run(self) -> int:
        """Start every process, then deal with each one's exit until none is left; the exit
        status."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.start("worker")
        for i in range(self.settings.workers):
            self.start(f"front-{i}")
        log.info(
            "serving on %s:%d with %d front processes",
            self.settings.host,
            self.settings.port,
            self.settings.workers,
        )
        while self.roles:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            role = self.roles.pop(pid, None)
            if role is not None:
                self._exited(pid, role, code)
        return self.status

    def start(self, role: str) -> None:
        if time.monotonic() - self.started.get(role, 0.0) < _RESTART_BACKOFF_S:
            time.sleep(_RESTART_BACKOFF_S)
        self.started[role] = time.monotonic()
        if role == "worker":
            pid = _fork(lambda: _worker(self.settings, self.shared))
        else:
            own = replace(self.shared, front=int(role.removeprefix("front-")))
            pid = _fork(lambda: _front(self.settings, own, self.sock))
        self.roles[pid] = role

    def stop(self, sig: int, frame: FrameType | None) -> None:
        """The first signal drains the fronts (the worker is stopped once they are gone); a
        second one kills every process at once."""
        if self.stopping:
            for pid in self.roles:
                os.kill(pid, signal.SIGKILL)
            return
        self.stopping = True
        log.info(
            "received %s: draining %d front processes",
            signal.Signals(sig).name,
            len(self.roles) - 1,
        )
        for pid, role in self.roles.items():
            if role.startswith("front"):
                os.kill(pid, signal.SIGTERM)

    def _exited(self, pid: int, role: str, code: int) -> None:
        """What a process's exit leaves behind is forgotten; then it is started again, or, while
        stopping, the worker is stopped once the last front has gone."""
        _forget(pid, self.shared)
        if role.startswith("front-"):
            self.shared.forget_front(int(role.removeprefix("front-")))
        if role == "worker" and self._worker_never_served():
            return
        if not self.stopping:
            log.error("%s (pid %d) exited with %s; starting another", role, pid, code)
            self.start(role)
        elif (
            not any(r.startswith("front") for r in self.roles.values()) and not self.worker_stopped
        ):
            self.worker_stopped = True
            for other, r in self.roles.items():
                if r == "worker":
                    os.kill(other, signal.SIGTERM)
        if code != 0 and self.stopping:
            self.status = 1

    def _worker_never_served(self) -> bool:
        """Whether the worker that exited never got as far as serving (missing weights, no GPU):
        then, as the single process does, the service stops, with the worker's message in the
        log."""
        was_ready = self.shared.worker_ready.value == 1
        self.shared.worker_ready.value = 0
        if was_ready or self.stopping:
            return False
        log.error("the inference worker could not start; stopping")
        self.stop(signal.SIGTERM, None)
        self.status = 1
        return True


def _forget(pid: int, shared: Shared) -> None:
    """What a dead process leaves: its slot file, and its live gauges' series."""
    from prometheus_client import multiprocess

    shared.slots_file(pid).unlink(missing_ok=True)
    multiprocess.mark_process_dead(pid)
