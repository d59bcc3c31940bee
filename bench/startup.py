"""Start-up: ``make serve`` (the weights' fetch, which verifies what is there, then the service) to
``/readyz`` 200, and the ready service's idle memory.

    python -m bench.startup                                # U2NET, 3 rounds
    python -m bench.startup --checkout before=../before --weights before=/path/to/v1-weights
    python -m bench.startup --image u2serve --image before=u2serve:before   # docker run
    python -m bench.startup --image u2serve --docker "docker -H unix:///path/to/docker.sock"

For each round and each checkout (alternating): the fetch step's seconds (where the checkout's
``make serve`` runs ``python -m weights fetch`` before the service; since it runs ``python -m
service --fetch``, the fetch is in the service's seconds), the service's seconds from its start
to ``/readyz`` 200 (polled every 20 ms), their sum, and the resident memory of the service's
processes once ready and idle (VmRSS, summed over the process tree). Medians at the end. The
weights must already be fetched and converted (the second start is what is measured, as a
restarted replica or a laptop's second ``make serve`` pays it).

``--image``: the CPU image as the Kubernetes manifest runs it (a read-only root, a fresh /tmp),
from ``docker run`` to ``/readyz`` 200 on the host's network, and the container's idle memory
(its processes' VmRSS, read from this host's /proc): what each replica an autoscaler adds pays
once its image is pulled. The fetch step's column is empty: an image has its weights baked in.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from bench.http import REPO
from model.weights import default_weights_dir


def _rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` and its children, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until_ready(port: int, gone: Callable[[], bool], what: str) -> None:
    """Poll ``/readyz`` on ``port`` every 20 ms until it answers 200; raise once ``gone()``."""
    while True:
        if gone():
            raise RuntimeError(f"{what} exited before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)


def one_start(checkout: Path, model: str, weights: Path) -> tuple[float, float, float]:
    """Seconds of the fetch step and of the service to ready, and the ready service's MiB. A
    checkout whose service fetches first (``python -m service --fetch``, what its ``make serve``
    runs) has one step: its fetch is counted in the service's seconds."""
    env = os.environ | {"U2SERVE_WEIGHTS_DIR": str(weights), "U2SERVE_MODEL": model}
    env.pop("PYTHONPATH", None)
    in_service = '"--fetch"' in (checkout / "service" / "__main__.py").read_text()
    t = time.perf_counter()
    if not in_service:
        subprocess.run(
            [sys.executable, "-m", "weights", "fetch", model],
            cwd=checkout,
            env=env,
            check=True,
            capture_output=True,
        )
    fetched = time.perf_counter() - t
    port = _free_port()
    t = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
        + (["--fetch"] if in_service else []),
        cwd=checkout,
        env=env | {"U2SERVE_LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            _until_ready(port, lambda: proc.poll() is not None, f"the service in {checkout}")
            ready = time.perf_counter() - t
            time.sleep(2)  # idle: what the warm-up left behind
            rss = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return fetched, ready, rss


def one_container(docker: list[str], image: str) -> tuple[float, float, float]:
    """Seconds from ``docker run`` to ready, as :func:`one_start`'s (no fetch step)."""
    port, name = _free_port(), f"u2serve-startup-{os.getpid()}"
    t = time.perf_counter()
    run = [*docker, "run", "-d", "--name", name, "--network=host", "--read-only"]
    run += ["--tmpfs", "/tmp:rw,nosuid,nodev,size=256m"]
    run += ["-e", f"U2SERVE_PORT={port}", "-e", "U2SERVE_HOST=127.0.0.1", image]
    subprocess.run(
        run,
        check=True,
        capture_output=True,
    )
    try:
        _until_ready(port, lambda: False, image)
        ready = time.perf_counter() - t
        time.sleep(2)
        pid = subprocess.run(
            [*docker, "inspect", "-f", "{{.State.Pid}}", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        rss = _rss_mib(int(pid))
    finally:
        subprocess.run([*docker, "rm", "-f", name], capture_output=True)
    return 0.0, ready, rss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.startup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="u2net")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkout", action="append", default=[], help="NAME=PATH, another checkout")
    p.add_argument(
        "--weights", action="append", default=[], help="NAME=DIR, a checkout's weights folder"
    )
    p.add_argument(
        "--image", action="append", default=[], help="[NAME=]IMAGE, a CPU image to docker run"
    )
    p.add_argument("--docker", default="docker", help="the docker command (default: docker)")
    args = p.parse_args(argv)
    checkouts = {} if args.image and not args.checkout else {"this": REPO}
    checkouts |= {
        name: Path(path).resolve() for name, _, path in (c.partition("=") for c in args.checkout)
    }
    images = {i.partition("=")[0] if "=" in i else i: i.rpartition("=")[2] for i in args.image}
    folders = {name: Path(path) for name, _, path in (w.partition("=") for w in args.weights)}
    starts: dict[str, Callable[[], tuple[float, float, float]]] = {
        name: partial(one_start, c, args.model, folders.get(name, default_weights_dir()))
        for name, c in checkouts.items()
    } | {name: partial(one_container, args.docker.split(), i) for name, i in images.items()}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in starts}
    print(f"{args.model}, {args.rounds} rounds, alternating")
    print("| checkout | round | fetch step s | service to ready s | total s | idle RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in range(args.rounds):
        for name, start in starts.items():
            got = start()
            results[name].append(got)
            f, s, m = got
            print(f"| {name} | {r + 1} | {f:.2f} | {s:.2f} | {f + s:.2f} | {m:.0f} |", flush=True)
    for name, rows in results.items():
        f, s, m = (statistics.median(col) for col in zip(*rows, strict=True))
        print(
            f"median {name}: fetch {f:.2f} s, service {s:.2f} s, total {f + s:.2f} s, {m:.0f} MiB"
        )


if __name__ == "__main__":
    main()
